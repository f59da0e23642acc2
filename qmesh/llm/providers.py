"""Remote model providers: OpenAI-compatible and Anthropic-style endpoints.

For: running a call on a provider's model through the pooled
:class:`~qmesh.web.pool.HttpPool`, with the provider's API key (from
the Gate's key store, never from the client) and the provider's own model
name. The OpenAI-compatible path forwards the client's body bytes as they
came when the model name already matches and nothing needs adding, and
relays response bytes without decoding them (usage is read from the tail).
The Anthropic path translates to ``/v1/messages`` and back.

On the Gate's plain-HTTP listener an OpenAI-compatible provider reached
over plain HTTP is not called from here at all: :meth:`OpenAIProvider.native_target`
gives the request bytes, and the HTTP engine sends them and relays the
answer (see :meth:`qmesh.llm.executor.Executor.relay`).

Upstream failures become :mod:`qmesh.qg.errors`: 429 and 503 (and a
connection refused) are :class:`UpstreamBusy`/:class:`UpstreamFailed`
before the first byte, so the failover loop moves on; other 4xx are the
client's fault and are relayed as they are (:class:`ClientFault`).

Not for: choosing a provider (the router) or prices (config, ``qmesh.finops``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any, Final

import trio

from qmesh.llm.backends import ClientFault
from qmesh.llm.calls import (
    Answer,
    Call,
    Usage,
    chat_chunk,
    chat_completion,
    read_usage,
    stream_end,
)
from qmesh.qg.candidates import Candidate
from qmesh.qg.errors import StreamBroken, UpstreamBusy, UpstreamFailed
from qmesh.web.exchange import ProxyTarget
from qmesh.web.pool import HttpPool, PoolError, Upstream, system_trust

__all__ = ["AnthropicProvider", "OpenAIProvider", "status_error"]

log = logging.getLogger(__name__)

_PATHS: Final = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
_BUSY_STATUSES: Final = frozenset({429, 503})
_CLIENT_STATUSES: Final = frozenset({400, 404, 413, 422})
FIRST_BYTE_TIMEOUT_S: Final = 120.0
CHUNK_TIMEOUT_S: Final = 120.0
ANTHROPIC_VERSION: Final = "2023-06-01"
ADDRESS_TTL_S: Final = 30.0
"""How long a provider's resolved address is used before it is looked up again."""


def status_error(status: int, body: bytes, who: str) -> Exception:
    """A provider's answer other than 200, as the failover loop treats it."""
    snippet = body[:300].decode("utf-8", "replace")
    if status in _BUSY_STATUSES:
        return UpstreamBusy(f"{who} is busy ({status}): {snippet}")
    if status in _CLIENT_STATUSES:
        return ClientFault(status, body)
    return UpstreamFailed(f"{who} answered {status}: {snippet}")


async def _post(
    client: HttpPool,
    upstream: Upstream,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    who: str,
) -> bytes:
    """POST ``body`` and return the 200 answer's body; anything else is the
    provider's failure, busy signal or the client's fault (status_error)."""
    try:
        status, _headers, data = await client.request(
            "POST", upstream, path, headers=headers, body=body, timeout_s=FIRST_BYTE_TIMEOUT_S
        )
    except PoolError as exc:
        raise UpstreamFailed(f"{who}: {exc}") from None
    if status != 200:
        raise status_error(status, data, who)
    return data


async def _relay(chunks: AsyncIterator[bytes], who: str, usage: Usage) -> AsyncIterator[bytes]:
    """Upstream SSE bytes to the client as they come, with a per-chunk
    timeout: a stalled upstream ends the stream, it never hangs it."""
    iterator = chunks.__aiter__()
    while True:
        with trio.move_on_after(CHUNK_TIMEOUT_S) as scope:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except PoolError as exc:
                raise StreamBroken(f"{who} broke off the stream: {exc}") from None
        if scope.cancelled_caught:
            raise StreamBroken(f"{who} sent nothing for {CHUNK_TIMEOUT_S:g} s")
        usage.absorb(chunk)
        yield chunk


class OpenAIProvider:
    """An OpenAI-compatible endpoint (``base_url`` ends in ``/v1``)."""

    def __init__(
        self, name: str, client: HttpPool, upstream: Upstream, api_key: str | None
    ) -> None:
        self.name = name
        self.client = client
        self.upstream = upstream
        self._headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        if api_key:
            self._headers.append((b"authorization", b"Bearer " + api_key.encode()))
        self._native_head = b"".join(
            b"%s: %s\r\n" % pair for pair in [(b"host", upstream.host_header), *self._headers]
        )
        self._address: tuple[str, float] | None = None  # an IP, and when it was looked up
        try:
            self._literal_ip: str | None = str(ipaddress.ip_address(upstream.host))
        except ValueError:
            self._literal_ip = None

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.name!r}>"

    async def _ip(self) -> str | None:
        """The upstream host's address (a name is looked up, then kept for
        ADDRESS_TTL_S); None when it cannot be resolved now."""
        if self._literal_ip is not None:
            return self._literal_ip
        host = self.upstream.host
        now = trio.current_time()
        if self._address is not None and now - self._address[1] < ADDRESS_TTL_S:
            return self._address[0]
        try:
            found = await trio.socket.getaddrinfo(host, self.upstream.port, type=socket.SOCK_STREAM)
        except OSError:
            return None
        if not found:
            return None
        ip = str(found[0][4][0])
        self._address = (ip, now)
        return ip

    async def native_target(self, candidate: Candidate, call: Call) -> ProxyTarget | None:
        """The request for the HTTP engine to send; None when the engine
        cannot reach the upstream (its name does not resolve now, or an
        https one without a CA file to verify it), and the pooled client
        serves it."""
        tls = None
        if self.upstream.scheme == "https":
            tls = system_trust()
            if tls is None:
                return None
        ip = await self._ip()
        if ip is None:
            return None
        model = candidate.upstream_model or candidate.model
        body = self._body(call, model, stream=call.stream)
        path = (self.upstream.path + _PATHS[call.endpoint]).encode()
        head = b"POST %s HTTP/1.1\r\n%s" % (path, self._native_head)
        request = b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body)
        return ProxyTarget(
            ip, self.upstream.port, request, self.name, head=head, model=model,
            tls=tls, server_name=self.upstream.host if tls is not None else None,
        )  # fmt: skip

    def _body(self, call: Call, model: str, *, stream: bool) -> bytes:
        body = call.body
        if body.get("model") == model and not stream:
            return call.raw  # forwarded untouched: nothing to rename or add
        out = dict(body)
        out["model"] = model
        if stream:
            out["stream"] = True
            options = dict(out.get("stream_options") or {})
            options["include_usage"] = True  # the ledger needs the real counts
            out["stream_options"] = options
        return json.dumps(out, separators=(",", ":")).encode()

    async def complete(self, candidate: Candidate, call: Call) -> Answer:
        model = candidate.upstream_model or candidate.model
        path = _PATHS[call.endpoint]
        body = self._body(call, model, stream=False)
        data = await _post(self.client, self.upstream, path, self._headers, body, self.name)
        tokens_in, tokens_out = read_usage(data)
        return Answer(data, tokens_in or call.tokens_in, tokens_out, model)

    async def stream(self, candidate: Candidate, call: Call, usage: Usage) -> AsyncIterator[bytes]:
        model = candidate.upstream_model or candidate.model
        body = self._body(call, model, stream=True)
        try:
            async with self.client.stream(
                "POST",
                self.upstream,
                _PATHS[call.endpoint],
                headers=self._headers,
                body=body,
                timeout_s=FIRST_BYTE_TIMEOUT_S,
            ) as response:
                if response.status != 200:
                    raise status_error(response.status, await response.read(), self.name)
                async for chunk in _relay(response.__aiter__(), self.name, usage):
                    yield chunk
        except PoolError as exc:
            raise UpstreamFailed(f"{self.name}: {exc}") from None


class AnthropicProvider:
    """An Anthropic-style ``/v1/messages`` endpoint, spoken to in its own
    shape and answered to the client in OpenAI's."""

    def __init__(
        self, name: str, client: HttpPool, upstream: Upstream, api_key: str | None
    ) -> None:
        self.name = name
        self.client = client
        self.upstream = upstream
        self._headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"anthropic-version", ANTHROPIC_VERSION.encode()),
        ]
        if api_key:
            self._headers.append((b"x-api-key", api_key.encode()))

    def __repr__(self) -> str:
        return f"<AnthropicProvider {self.name!r}>"

    def _body(self, call: Call, model: str, *, stream: bool) -> bytes:
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        if call.endpoint == "chat":
            for message in call.body.get("messages") or ():
                if not isinstance(message, dict):
                    continue
                role = message.get("role")
                content = message.get("content")
                if role == "system":
                    system.append(content if isinstance(content, str) else json.dumps(content))
                elif role in ("user", "assistant"):
                    messages.append({"role": role, "content": content})
        else:
            messages.append({"role": "user", "content": call.text()})
        out: dict[str, Any] = {
            "model": model,
            "max_tokens": call.max_tokens,
            "messages": messages,
        }
        if system:
            out["system"] = "\n".join(system)
        for key in ("temperature", "top_p"):
            if key in call.body:
                out[key] = call.body[key]
        if call.body.get("stop"):
            stop = call.body["stop"]
            out["stop_sequences"] = stop if isinstance(stop, list) else [stop]
        if stream:
            out["stream"] = True
        return json.dumps(out, separators=(",", ":")).encode()

    async def complete(self, candidate: Candidate, call: Call) -> Answer:
        if call.endpoint == "embeddings":
            raise ClientFault(400, b'{"error":{"message":"no embeddings at this provider"}}')
        model = candidate.upstream_model or candidate.model
        body = self._body(call, model, stream=False)
        data = await _post(
            self.client, self.upstream, "/v1/messages", self._headers, body, self.name
        )
        try:
            reply = json.loads(data)
            text = "".join(
                block.get("text", "")
                for block in reply.get("content", [])
                if isinstance(block, dict)
            )
            usage = reply.get("usage") or {}
            tokens_in = int(usage.get("input_tokens", 0))
            tokens_out = int(usage.get("output_tokens", 0))
        except (ValueError, AttributeError, TypeError) as exc:
            raise UpstreamFailed(f"{self.name}: unreadable answer: {exc}") from None
        return Answer(
            chat_completion(call.request_id, model, text, tokens_in, tokens_out),
            tokens_in,
            tokens_out,
            model,
        )

    async def stream(self, candidate: Candidate, call: Call, usage: Usage) -> AsyncIterator[bytes]:
        model = candidate.upstream_model or candidate.model
        body = self._body(call, model, stream=True)
        rid = call.request_id
        try:
            async with self.client.stream(
                "POST",
                self.upstream,
                "/v1/messages",
                headers=self._headers,
                body=body,
                timeout_s=FIRST_BYTE_TIMEOUT_S,
            ) as response:
                if response.status != 200:
                    raise status_error(response.status, await response.read(), self.name)
                yield chat_chunk(rid, model, role="assistant", content="")
                buffer = b""
                async for chunk in _relay(response.__aiter__(), self.name, Usage()):
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data:"):
                                continue
                            out = self._translate(line[5:].strip(), rid, model, usage)
                            if out:
                                yield out
                for end in stream_end(call, model, usage):
                    yield end
        except PoolError as exc:
            raise UpstreamFailed(f"{self.name}: {exc}") from None

    @staticmethod
    def _translate(data: bytes, rid: str, model: str, usage: Usage) -> bytes | None:
        try:
            event = json.loads(data)
        except ValueError:
            return None
        kind = event.get("type")
        if kind == "content_block_delta":
            text = (event.get("delta") or {}).get("text")
            if text:
                return chat_chunk(rid, model, content=text)
        elif kind == "message_start":
            found = ((event.get("message") or {}).get("usage") or {}).get("input_tokens")
            if found:
                usage.tokens_in = int(found)
        elif kind == "message_delta":
            found = (event.get("usage") or {}).get("output_tokens")
            if found:
                usage.tokens_out = int(found)
        elif kind == "error":
            message = (event.get("error") or {}).get("message", "provider error")
            raise StreamBroken(f"provider error mid-stream: {message}")
        return None
