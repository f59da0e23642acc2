"""llama.cpp's OpenAI-compatible API, served without per-token overhead.

For: :func:`serve`, what a model server process runs (started by
:mod:`~qmesh.daemon.runtimes.model_server`): it takes ``llama_cpp.server``'s
own command line (``--model``, ``--model_alias``, ``--n_ctx``,
``--n_gpu_layers``, ``--chat_format``… and any extra flag an operator adds),
builds the ``Llama`` as that server would (but without ``logits_all`` unless
asked: see :func:`parse_arguments`), validates requests with
its request types (so defaults and sampling are the same), and answers
``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``, streamed (server-sent events) or not.

Why not ``llama_cpp.server`` itself: it hands every token from the
generating thread to an asyncio loop through a worker-thread hop, and asks
the loop whether the client has gone, per token. The loop's Python work
then competes for the GIL with the generating thread — whose sampling is
Python too — and the generation slows by 10–15 % on a small machine. Here
the thread that generates writes each event to the socket itself (one
``sendall``, GIL released), and a client that went away is noticed by that
write failing, which ends the generation.

One generation at a time (the model has one context; the daemon's scheduler
queues ahead of this anyway); other requests wait their turn. Bounded: a
request head and body (:data:`MAX_BODY_BYTES`), each socket read and write
(:data:`SOCKET_TIMEOUT_S`), and the connections served at once
(:data:`MAX_CONNECTIONS`; more are answered 503).

Not for: supervision (:class:`~qmesh.daemon.runtimes.llamacpp.LlamaCppRuntime`)
or embeddings (the daemon does not serve them).
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
import threading
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import ValidationError

__all__ = ["MAX_BODY_BYTES", "MAX_CONNECTIONS", "SOCKET_TIMEOUT_S", "serve"]

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
SOCKET_TIMEOUT_S: Final = 60.0
"""Longest wait for a read or a write: a peer that neither sends nor reads
loses its connection (and its generation), not the model."""
MAX_CONNECTIONS: Final = 64

_COMPLETION_EXCLUDE: Final = frozenset({"n", "best_of", "logit_bias_type", "user", "min_tokens"})
_CHAT_EXCLUDE: Final = frozenset({"n", "logit_bias_type", "user", "min_tokens"})
"""What ``llama_cpp.server`` leaves out of the call, as it does."""


class _Refused(Exception):
    """A request this server answers with an error status."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class LlamaServer(ThreadingHTTPServer):
    daemon_threads = True
    # The supervisor picks a free port and retries on a clash: taking over a
    # port another process still listens on would hide that clash.
    allow_reuse_address = False

    def __init__(
        self, address: tuple[str, int], llama: llama_cpp.Llama, alias: str, api_key: str | None
    ) -> None:
        super().__init__(address, _Handler)
        self.llama = llama
        self.alias = alias
        self.api_key = api_key
        self.generating = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)


class _Handler(BaseHTTPRequestHandler):
    server: LlamaServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server_version = "qmesh-llama"
    disable_nagle_algorithm = True  # each event goes out as it is written

    def log_message(self, format: str, *args: Any) -> None:
        return  # one line per request would drown the log the daemon tails on failure

    def handle(self) -> None:
        if not self.server.slots.acquire(blocking=False):
            self.close_connection = True
            self._answer_busy()
            return
        try:
            super().handle()
        finally:
            self.server.slots.release()

    def _answer_busy(self) -> None:
        body = _error_body("too many connections to this model server")
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        try:
            self.wfile.write(head.encode() + body)
        except OSError:
            pass

    # -- routes ----------------------------------------------------------------

    def do_GET(self) -> None:
        try:
            self._authorize()
            if self.path.split("?", 1)[0] != "/v1/models":
                raise _Refused(HTTPStatus.NOT_FOUND, f"no route {self.path!r}")
            model = {"id": self.server.alias, "object": "model", "owned_by": "me"}
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        except _Refused as exc:
            self._send_error(exc)

    def do_POST(self) -> None:
        try:
            self._authorize()
            path = self.path.split("?", 1)[0]
            if path == "/v1/completions":
                self._generate(chat=False)
            elif path == "/v1/chat/completions":
                self._generate(chat=True)
            else:
                self._read_body()
                raise _Refused(HTTPStatus.NOT_FOUND, f"no route {self.path!r}")
        except _Refused as exc:
            self._send_error(exc)

    # -- generation ------------------------------------------------------------

    def _generate(self, *, chat: bool) -> None:
        raw = self._read_body()
        kind = CreateChatCompletionRequest if chat else CreateCompletionRequest
        try:
            body: Any = kind.model_validate_json(raw)
        except ValidationError as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, _first_error(exc)) from None
        if not chat and isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise _Refused(HTTPStatus.BAD_REQUEST, "one prompt per request")
            body.prompt = body.prompt[0] if body.prompt else ""
        kwargs = body.model_dump(exclude=_CHAT_EXCLUDE if chat else _COMPLETION_EXCLUDE)
        llama = self.server.llama
        with self.server.generating:
            self._prepare(llama, body, kwargs)
            call = llama.create_chat_completion if chat else llama.create_completion
            try:
                result = call(**kwargs)
            except ValueError as exc:  # llama.cpp's own refusals: prompt too long…
                raise _Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
            except Exception as exc:
                traceback.print_exc()
                raise _Refused(
                    HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}"
                ) from None
            if kwargs.get("stream"):
                self._stream(cast(Iterator[Any], result))
                return
        # A whole answer is sent with the model free for the next request: a
        # slow reader holds its own connection, not the generation.
        try:
            self._send_json(HTTPStatus.OK, result)
        except OSError:
            self.close_connection = True

    @staticmethod
    def _prepare(llama: llama_cpp.Llama, body: Any, kwargs: dict[str, Any]) -> None:
        """What ``llama_cpp.server`` does to a request before the call."""
        if body.logit_bias is not None:
            if body.logit_bias_type == "tokens":
                biases: dict[str, float] = {}
                for token, score in body.logit_bias.items():
                    for input_id in llama.tokenize(token.encode(), add_bos=False, special=True):
                        biases[str(input_id)] = score
                kwargs["logit_bias"] = biases
            else:
                kwargs["logit_bias"] = body.logit_bias
        if body.grammar is not None:
            try:
                kwargs["grammar"] = LlamaGrammar.from_string(body.grammar)
            except ValueError as exc:
                raise _Refused(HTTPStatus.BAD_REQUEST, f"grammar: {exc}") from None
        if body.min_tokens > 0:
            processor = llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llama.token_eos())
            kwargs.setdefault("logits_processor", llama_cpp.LogitsProcessorList()).append(processor)

    def _stream(self, chunks: Iterator[Any]) -> None:
        """One server-sent event per chunk, each in one write, as it is made."""
        try:
            try:
                # The prompt is evaluated here: its refusals are still a status.
                chunk = next(chunks, None)
            except ValueError as exc:
                raise _Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
            except Exception as exc:
                traceback.print_exc()
                raise _Refused(
                    HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}"
                ) from None
            self.send_response(HTTPStatus.OK)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            self._events(chunks, chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator left early stops generating

    def _events(self, chunks: Iterator[Any], chunk: Any) -> None:
        write = self.wfile.write
        sent = 0
        try:
            try:
                while chunk is not None:
                    event = b"data: " + json.dumps(chunk, separators=(",", ":")).encode()
                    write(b"%x\r\n%b\n\n\r\n" % (len(event) + 2, event))
                    sent += 1
                    chunk = next(chunks, None)
            except OSError:
                raise
            except Exception as exc:  # llama.cpp failed mid-stream: tell the client so
                traceback.print_exc()
                error = {"error": {"message": f"generation failed: {exc}", "type": "server_error"}}
                event = b"data: " + json.dumps(error).encode()
                write(b"%x\r\n%b\n\n\r\n" % (len(event) + 2, event))
            done = b"data: [DONE]\n\n"
            write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        except OSError as exc:
            # The client went away (or stopped reading for SOCKET_TIMEOUT_S).
            self.close_connection = True
            print(f"generation stopped after {sent} events: the client left ({exc})",
                  file=sys.stderr, flush=True)  # fmt: skip

    # -- HTTP plumbing -----------------------------------------------------------

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self.close_connection = True
            raise _Refused(HTTPStatus.UNAUTHORIZED, "invalid API key")

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding"):
            self.close_connection = True
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a content-length")
        try:
            length = int(self.headers.get("content-length") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body must have a content-length of at most {MAX_BODY_BYTES} bytes",
            )
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _Refused(HTTPStatus.BAD_REQUEST, "the body ended early")
        return body

    def _send_json(self, status: HTTPStatus, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's refusals (a head too long, not HTTP…), in JSON like ours."""
        self.close_connection = True
        self.request_version = self.protocol_version  # never answer in HTTP/0.9, head-less
        status = HTTPStatus(code)
        self._send_error(_Refused(status, message or status.phrase))

    def _send_error(self, error: _Refused) -> None:
        body = _error_body(str(error))
        self.send_response(error.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


def _error_body(message: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "code": None}
    return json.dumps({"error": error}).encode()


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return f"{where}: {first.get('msg', 'invalid')}"


def parse_arguments(argv: list[str]) -> tuple[ServerSettings, ModelSettings]:
    """``llama_cpp.server``'s command line, read as that server reads it."""
    parser = argparse.ArgumentParser(prog="qmesh-llama-server")
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    # (typed as returning the class; it returns an instance)
    server = cast(ServerSettings, parse_model_from_args(ServerSettings, args))
    model = cast(ModelSettings, parse_model_from_args(ModelSettings, args))
    if args.logits_all is None:
        # llama_cpp.server keeps every position's logits by default (only
        # logprobs need them): a vocabulary-wide copy per token, and a
        # prompt's worth at each prompt. Asked for, it is still there.
        model.logits_all = False
    if server.ssl_keyfile or server.ssl_certfile:
        parser.error("TLS is not served here: model servers listen on loopback only")
    return server, model


def serve(argv: list[str]) -> None:
    """Load the model, then listen (readiness is ``GET /v1/models`` answering)."""
    server_settings, model_settings = parse_arguments(argv)
    alias = model_settings.model_alias or model_settings.model
    llama = LlamaProxy.load_llama_from_model_settings(model_settings)
    where = f"{server_settings.host}:{server_settings.port}"
    try:
        httpd = LlamaServer(
            (server_settings.host, server_settings.port), llama, alias, server_settings.api_key
        )
    except OSError as exc:
        sys.exit(f"cannot listen on {where}: {exc}")
    print(f"serving {alias} on http://{where}", flush=True)
    httpd.serve_forever()
