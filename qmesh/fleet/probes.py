"""Sans-IO service probes: what to send to an address, and what the answers say it is.

For: :class:`TargetProbe`, which picks the next exchange with one
``host:port`` (an HTTP ``GET`` or PostgreSQL's SSLRequest) from the
outcomes so far and turns them into a :class:`Finding` — kind, server
software, version, models with their metadata and a one-line reason; and
the byte-level halves of one exchange, :class:`HttpExchange` and
:class:`PgSslExchange` (:meth:`start` gives the bytes to send,
:meth:`feed` takes what arrived, ``b""`` meaning end of stream, and
returns an :class:`Outcome` once it knows one). Every buffer has a cap, so
a peer that sends without end cannot make a probe grow without bound.

What is asked, in order (the first answer that fits decides the kind):

- ``GET /healthz`` answering ``{"status": "ok", "sessions": …}``: a qmesh
  Gate (``qmesh-gate``); ``{"status": "ok", "node": …, "gate_connected": …}``:
  a qmesh daemon's health port (``qmesh-daemon``);
- ``GET /api/version`` answering ``{"version": "…"}`` and nothing else: ``ollama``;
- ``GET /props`` with ``default_generation_settings`` or ``total_slots``:
  llama.cpp's own server (``llama.cpp``);
- ``GET /v1/models`` with ``{"data": [{"id": …}, …]}``, or an OpenAI-style
  401 error: another OpenAI-compatible server (``openai``);
- any other HTTP answer: ``http``;
- the SSLRequest answered with exactly one byte, ``S`` or ``N``: ``postgres``.

Then the kind's own endpoints fill in the models: Ollama's ``/api/tags``
and ``/api/ps``; llama.cpp's ``/health``, ``/slots`` and ``/v1/models``;
a daemon's ``/api/node``; for other OpenAI-compatible servers
``/openapi.json`` and ``/version`` tell the software apart — ``python -m
llama_cpp.server`` (llama-cpp-python) is an ``openai`` server whose
``server`` is ``llama-cpp-python``, not llama.cpp's own server, which it
only embeds. Whatever accepts a connection but speaks neither HTTP nor
PostgreSQL is ``unknown``; an address where nothing accepts is ``absent``.

PostgreSQL is asked only with the 8-byte SSLRequest: no credentials, and
a server that is then hung up on logs nothing. Ports that usually carry
PostgreSQL, and addresses last found to be PostgreSQL, are asked that
first, so the server is not sent an HTTP request it would log as an
invalid startup packet.

Not for: sockets, time or concurrency (:mod:`qmesh.fleet.discovery`), or
keeping the results (:mod:`qmesh.fleet.inventory`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, Final

import attrs
import h11

from qmesh import __version__

__all__ = [
    "KINDS",
    "PG_SSL_REQUEST",
    "Finding",
    "HttpExchange",
    "Outcome",
    "PgSslExchange",
    "TargetProbe",
    "parse_parameters",
    "quantization_from_name",
]

KINDS: Final = (
    "qmesh-gate", "qmesh-daemon", "ollama", "llama.cpp", "openai", "postgres", "http",
    "unknown", "absent",
)  # fmt: skip
"""Every kind a probe can report. ``unknown`` and ``absent`` are not services.
qmesh's own roles found by a scan are ``qmesh-gate`` and ``qmesh-daemon``:
the inventory's ``daemon`` kind is kept for daemons connected to this Gate,
the ones it can route to."""

MAX_HEAD: Final = 16 * 1024
MAX_BODY: Final = 2 * 1024 * 1024
"""An answer's body beyond this is not read (llama-cpp-python's OpenAPI
document, the largest we ask for, is about 100 KB)."""
PREVIEW: Final = 32
"""Bytes of a non-HTTP answer kept to show the operator."""
PG_PORTS: Final = frozenset({5432, 5433, 6432})
PG_SSL_REQUEST: Final = struct.pack("!II", 8, 80877103)
"""PostgreSQL's SSLRequest: length 8, code 1234.5679. Answered with one byte."""

CONNECT_FAILURES: Final = frozenset({"refused", "unreachable", "connect_timeout"})
FAILURES: Final = (
    *CONNECT_FAILURES, "timeout", "reset", "closed", "garbage", "too_large",
)  # fmt: skip
_HTTP_FIRST: Final = ("/healthz", "/api/version", "/props", "/v1/models")
_USER_AGENT: Final = f"qmesh-discovery/{__version__}"


# -- one exchange ------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """How one exchange went: an HTTP answer, a PostgreSQL reply, or a failure."""

    status: int | None = None
    """The HTTP status, when an HTTP answer came."""
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    pg: str | None = None
    """``S`` or ``N``: PostgreSQL answered the SSLRequest."""
    failure: str | None = None
    """One of :data:`FAILURES` when neither came."""
    detail: str = ""
    first_bytes: bytes = b""
    """The first bytes the peer sent, whatever they were."""

    @classmethod
    def failed(cls, failure: str, detail: str = "", first_bytes: bytes = b"") -> Outcome:
        assert failure in FAILURES, failure
        return cls(failure=failure, detail=detail, first_bytes=first_bytes[:PREVIEW])

    def json(self) -> Any:
        """The body as JSON, or None when it is not (or the status is not 2xx)."""
        if self.status is None or not 200 <= self.status < 300:
            return None
        return _loads(self.body)


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


class HttpExchange:
    """``GET path`` and its answer, on a connection of its own (``Connection: close``)."""

    def __init__(self, host_header: str, path: str, *, max_body: int = MAX_BODY) -> None:
        self.path = path
        self._host = host_header
        self._max_body = max_body
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self._first = b""
        self._head: h11.Response | None = None
        self._body = bytearray()

    def start(self) -> bytes:
        headers = [
            ("host", self._host),
            ("user-agent", _USER_AGENT),
            ("accept", "application/json"),
            ("connection", "close"),
        ]
        data = self._conn.send(h11.Request(method="GET", target=self.path, headers=headers))
        return (data or b"") + (self._conn.send(h11.EndOfMessage()) or b"")

    def feed(self, data: bytes) -> Outcome | None:
        if len(self._first) < PREVIEW:
            self._first += data[: PREVIEW - len(self._first)]
        if self._head is None and self._first[:5] != b"HTTP/"[: len(self._first[:5])]:
            # Every HTTP answer starts so: an SSH banner or binary noise is
            # known for what it is without waiting for a head that never ends.
            return self._not_http("does not start like an HTTP answer")
        try:
            self._conn.receive_data(data)
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    return None
                if isinstance(event, h11.Response):
                    self._head = event
                elif isinstance(event, h11.Data):
                    self._body += event.data
                    if len(self._body) > self._max_body:
                        return self._answer(truncated=True)
                elif isinstance(event, h11.EndOfMessage):
                    return self._answer()
                elif isinstance(event, h11.ConnectionClosed):
                    return self._not_http("closed the connection mid-answer")
                # InformationalResponse (1xx): the real answer follows.
        except h11.RemoteProtocolError as exc:
            return self._not_http(str(exc))

    @property
    def received(self) -> bytes:
        """The first bytes the peer sent (up to :data:`PREVIEW`)."""
        return self._first

    def timed_out(self, seconds: float) -> Outcome:
        """The answer did not complete within ``seconds``."""
        detail = f"no complete answer within {seconds:g}s"
        if self._head is not None:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._head.headers
            }
            return Outcome(status=self._head.status_code, headers=headers, failure="timeout",
                           detail=detail, first_bytes=self._first)  # fmt: skip
        if self._first:
            # Bytes came, but never an HTTP status line: not HTTP.
            return Outcome.failed("garbage", detail, self._first)
        return Outcome.failed("timeout", detail)

    def _answer(self, *, truncated: bool = False) -> Outcome:
        assert self._head is not None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._head.headers}
        if truncated:
            return Outcome(
                status=self._head.status_code,
                headers=headers,
                failure="too_large",
                detail=f"body over {self._max_body} bytes",
                first_bytes=self._first,
            )
        return Outcome(status=self._head.status_code, headers=headers, body=bytes(self._body))

    def _not_http(self, why: str) -> Outcome:
        if self._head is not None:
            # The head was HTTP: it is an HTTP server that broke off its answer.
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._head.headers
            }
            return Outcome(status=self._head.status_code, headers=headers, failure="closed",
                           detail=why, first_bytes=self._first)  # fmt: skip
        if not self._first:
            return Outcome.failed("closed", "closed the connection without answering")
        return Outcome.failed("garbage", why, self._first)


class PgSslExchange:
    """PostgreSQL's SSLRequest; a server answers exactly ``S`` or ``N``."""

    path = "SSLRequest"

    def __init__(self) -> None:
        self._received = b""

    def start(self) -> bytes:
        return PG_SSL_REQUEST

    def feed(self, data: bytes) -> Outcome | None:
        if not data:
            if not self._received:
                return Outcome.failed("closed", "closed the connection without answering")
            return self._verdict()
        self._received += data[:PREVIEW]
        return self._verdict()

    @property
    def received(self) -> bytes:
        return self._received

    def timed_out(self, seconds: float) -> Outcome:
        if self._received:
            return self._verdict()
        return Outcome.failed("timeout", f"no answer within {seconds:g}s")

    def _verdict(self) -> Outcome:
        # The server sends nothing after its one byte until the client speaks
        # again, so a longer first answer is something else.
        if self._received in (b"S", b"N"):
            return Outcome(pg=self._received.decode())
        return Outcome.failed("garbage", "not an answer to SSLRequest", self._received)


Exchange = HttpExchange | PgSslExchange


# -- what an address is -------------------------------------------------------------------


@attrs.frozen(eq=False)
class Finding:
    """What was found at one address."""

    kind: str
    """One of :data:`KINDS`."""
    reason: str
    """One line for the operator: what answered, or why nothing useful did."""
    alive: bool = True
    """Something accepted the connection (False only for ``absent``)."""
    server: str | None = None
    """The software when known: ``ollama``, ``llama.cpp``, ``llama-cpp-python``, ``vllm``…"""
    version: str | None = None
    models: tuple[dict[str, Any], ...] = ()
    """Each in the shape :meth:`qmesh.fleet.inventory.InventoryModel.from_report` reads."""
    telemetry: dict[str, Any] | None = None
    details: dict[str, Any] = attrs.field(factory=dict)

    @property
    def is_service(self) -> bool:
        return self.kind not in ("unknown", "absent")


class TargetProbe:
    """Decides the exchanges with one address and what they add up to.

    Drive it with ``while (exchange := probe.next_exchange()) is not None``:
    run the exchange, :meth:`feed` its outcome; then :meth:`finding`.
    """

    def __init__(self, host_header: str, port: int, *, postgres_first: bool = False) -> None:
        self.host_header = host_header
        self._order = ["pg", "http"] if postgres_first or port in PG_PORTS else ["http", "pg"]
        self._phase: str | None = self._order[0]
        self._tried: set[str] = set()
        self._queue: list[str] = list(_HTTP_FIRST)
        self._answers: dict[str, Outcome] = {}
        self._kind: str | None = None
        self._pg: Outcome | None = None
        self._absent: Outcome | None = None
        self._failures: list[tuple[str, Outcome]] = []
        self._current: Exchange | None = None

    def next_exchange(self) -> Exchange | None:
        if self._phase == "pg":
            self._current = PgSslExchange()
            return self._current
        if self._phase == "http" and self._queue:
            self._current = HttpExchange(self.host_header, self._queue.pop(0))
            return self._current
        self._current = None
        return None

    def feed(self, outcome: Outcome) -> None:
        current = self._current
        assert current is not None, "feed() follows next_exchange()"
        if outcome.failure in CONNECT_FAILURES:
            if not self._answers and not self._failures:
                self._absent = outcome  # nothing ever accepted: absent
            self._phase = None  # it went away mid-probe: what we have is what we know
            return
        if isinstance(current, PgSslExchange):
            self._tried.add("pg")
            if outcome.pg is not None:
                self._pg = outcome
                self._phase = None
                return
            self._failures.append(("PostgreSQL", outcome))
            self._phase = "http" if "http" not in self._tried else None
            return
        self._tried.add("http")
        if outcome.status is None:
            if not self._answers:
                # Not HTTP at all: no use asking the other paths.
                self._failures.append(("HTTP", outcome))
                self._queue = []
                self._phase = "pg" if "pg" not in self._tried else None
            return  # a later path timing out only costs that path
        self._answers[current.path] = outcome
        self._advance(current.path, outcome)
        if not self._queue:
            self._phase = None

    def _advance(self, path: str, outcome: Outcome) -> None:
        if self._kind is not None:
            return
        data = outcome.json()
        if path == "/healthz" and isinstance(data, dict) and data.get("status") == "ok":
            if "sessions" in data and "version" in data:
                self._kind, self._queue = "qmesh-gate", []
            elif "node" in data and "gate_connected" in data:
                self._kind, self._queue = "qmesh-daemon", ["/api/node"]
        elif path == "/api/version" and _is_ollama_version(data):
            self._kind, self._queue = "ollama", ["/api/tags", "/api/ps"]
        elif (
            path == "/props"
            and isinstance(data, dict)
            and ("default_generation_settings" in data or "total_slots" in data)
        ):
            self._kind, self._queue = "llama.cpp", ["/health", "/slots", "/v1/models"]
        elif path == "/v1/models" and (_model_list(data) is not None or _needs_key(outcome)):
            self._kind, self._queue = "openai", ["/openapi.json", "/version"]

    # -- the verdict ---------------------------------------------------------------------

    def finding(self, *, out_of_time: float | None = None) -> Finding:
        """What the outcomes add up to; ``out_of_time``: the probe's time
        budget (seconds) ran out before it finished."""
        if self._absent is not None:
            return Finding("absent", _describe(self._absent), alive=False)
        if self._pg is not None:
            ssl = self._pg.pg == "S"
            return Finding(
                "postgres",
                f"PostgreSQL: answers SSLRequest with {self._pg.pg!r} "
                f"({'TLS offered' if ssl else 'no TLS'})",
                server="postgresql",
                details={"ssl": ssl},
            )
        if self._kind is not None:
            finding = _BUILDERS[self._kind](self._answers)
            if out_of_time is not None:
                note = f"; probe stopped after {out_of_time:g}s"
                finding = attrs.evolve(finding, reason=finding.reason + note)
            return finding
        if self._answers:
            return _plain_http(self._answers)
        if out_of_time is not None and not self._failures:
            return Finding("unknown", f"accepted the connection but the probe ran out of "
                                      f"time ({out_of_time:g}s)")  # fmt: skip
        parts = [f"{proto}: {_describe(outcome)}" for proto, outcome in self._failures]
        if out_of_time is not None:
            parts.append(f"probe stopped after {out_of_time:g}s")
        return Finding(
            "unknown",
            "answers neither HTTP nor PostgreSQL (" + "; ".join(parts) + ")",
            details={
                "first_bytes": next(
                    (o.first_bytes.hex() for _, o in self._failures if o.first_bytes), None
                )
            },
        )


def _describe(outcome: Outcome) -> str:
    if outcome.failure == "refused":
        return "connection refused: nothing listens there"
    if outcome.failure == "connect_timeout":
        return f"no answer to connect ({outcome.detail or 'timed out'}): host down or filtered"
    if outcome.failure == "unreachable":
        return f"unreachable: {outcome.detail}"
    if outcome.failure == "timeout":
        return f"connected, then silence ({outcome.detail or 'read timed out'})"
    if outcome.failure == "reset":
        if outcome.first_bytes:
            return f"sent {outcome.first_bytes!r}, then reset the connection"
        return "the connection was reset"
    if outcome.failure == "closed":
        return outcome.detail or "closed the connection without answering"
    if outcome.failure == "garbage":
        if outcome.first_bytes[:2] in (b"\x15\x03", b"\x16\x03"):
            return "sent a TLS record (a TLS-only service)"
        return f"sent {outcome.first_bytes!r}"
    return outcome.detail or str(outcome.failure)


# -- shapes ------------------------------------------------------------------------------------


def _is_ollama_version(data: Any) -> bool:
    return isinstance(data, dict) and set(data) == {"version"} and isinstance(data["version"], str)


def _model_list(data: Any) -> list[dict[str, Any]] | None:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    items = [m for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return items if len(items) == len(data["data"]) else None


def _needs_key(outcome: Outcome) -> bool:
    """An OpenAI-style 401: ``{"error": …}`` from a server that wants an API key."""
    if outcome.status not in (401, 403):
        return False
    data = _loads(outcome.body)
    return isinstance(data, dict) and "error" in data


def _json(answers: Mapping[str, Outcome], path: str) -> Any:
    outcome = answers.get(path)
    return None if outcome is None else outcome.json()


def _obj(answers: Mapping[str, Outcome], path: str) -> dict[str, Any]:
    """The answer to ``path`` when it is a JSON object, else ``{}``."""
    data = _json(answers, path)
    return data if isinstance(data, dict) else {}


def _sub(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


_QUANT_RE: Final = re.compile(
    r"(?<![a-z0-9])(i?q[1-8](?:_[a-z0-9]{1,3})+|bf16|fp16|f16|f32)(?![a-z0-9])", re.IGNORECASE
)


def quantization_from_name(name: str) -> str | None:
    """``gemma-3-270m-q4_k_m.gguf`` → ``Q4_K_M``; None when the name says nothing."""
    found = _QUANT_RE.findall(PurePosixPath(name).name)
    return found[-1].upper() if found else None


_PARAMS_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMBT])", re.IGNORECASE)
_SCALE: Final = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_parameters(text: object) -> int | None:
    """Ollama's ``parameter_size`` (``"1.2B"``, ``"270M"``) as a count."""
    if not isinstance(text, str):
        return None
    match = _PARAMS_RE.fullmatch(text.strip())
    if match is None:
        return None
    return int(float(match.group(1)) * _SCALE[match.group(2).lower()])


def _model_id(served_as: str) -> str:
    """The id the inventory uses: a path to a GGUF file is named by its
    stem, as the daemons' catalogs name the same file, so one model has
    one id wherever it runs."""
    path = PurePosixPath(served_as)
    return path.stem if path.suffix.lower() == ".gguf" else served_as


def _list(data: object, key: str) -> list[Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, list) else []


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# -- builders: answers → Finding ------------------------------------------------------------


def _gate(answers: Mapping[str, Outcome]) -> Finding:
    health = _obj(answers, "/healthz")
    version = _str(health.get("version"))
    return Finding(
        "qmesh-gate",
        f"qmesh Gate {version or ''}".rstrip() + f", {health.get('sessions', 0)} tunnel session(s)",
        server="qmesh",
        version=None if version is None else f"qmesh/{version}",
        details={"sessions": _int(health.get("sessions"))},
    )


def _daemon(answers: Mapping[str, Outcome]) -> Finding:
    health = _obj(answers, "/healthz")
    node = _obj(answers, "/api/node")
    inventory = _sub(node, "inventory")
    models = tuple(m for m in inventory.get("models") or () if isinstance(m, dict))
    telemetry = inventory.get("telemetry")
    name = _str(health.get("node")) or _str(node.get("node"))
    connected = health.get("gate_connected") is True
    return Finding(
        "qmesh-daemon",
        f"qmesh daemon {name!r} ({'connected to' if connected else 'not connected to'} "
        f"its Gate), {len(models)} model(s)",
        server="qmesh",
        version=_str(node.get("version")),
        models=models,
        telemetry=telemetry if isinstance(telemetry, dict) else None,
        details={
            "node": name,
            "gate_connected": connected,
            "host": _str(node.get("host")),
            "runtimes": inventory.get("runtimes"),
        },
    )


def _ollama(answers: Mapping[str, Outcome]) -> Finding:
    version = _obj(answers, "/api/version").get("version")
    tags = _json(answers, "/api/tags")
    running = _json(answers, "/api/ps")
    loaded: dict[str, dict[str, Any]] = {}
    for item in _list(running, "models"):
        if isinstance(item, dict) and _str(item.get("name")):
            loaded[item["name"]] = item
    models: dict[str, dict[str, Any]] = {}
    for item in [*_list(tags, "models"), *loaded.values()]:
        if not isinstance(item, dict) or not _str(item.get("name")) or item["name"] in models:
            continue
        details = _sub(item, "details")
        ps = loaded.get(item["name"]) or {}
        models[item["name"]] = {
            "id": item["name"],
            "runtime": "ollama",
            "state": "loaded" if ps else "available",
            "family": _str(details.get("family")),
            "quantization": _str(details.get("quantization_level")),
            "parameters": parse_parameters(details.get("parameter_size")),
            "context_length": _int(ps.get("context_length")),
            "size": _int(item.get("size")),
            "digest": _str(item.get("digest")),
            "format": _str(details.get("format")),
            "parameter_size": _str(details.get("parameter_size")),
            "size_vram": _int(ps.get("size_vram")),
            "expires_at": _str(ps.get("expires_at")),
        }
    n_loaded = sum(1 for m in models.values() if m["state"] == "loaded")
    return Finding(
        "ollama",
        f"Ollama {version}, {len(models)} model(s), {n_loaded} loaded",
        server="ollama",
        version=_str(version),
        models=tuple(models.values()),
        details={"tags_ok": isinstance(tags, dict), "ps_ok": isinstance(running, dict)},
    )


def _llamacpp(answers: Mapping[str, Outcome]) -> Finding:
    props = _obj(answers, "/props")
    settings = _sub(props, "default_generation_settings")
    health_answer = answers.get("/health")
    health = "unknown"
    if health_answer is not None and health_answer.status is not None:
        health = "ok" if health_answer.status == 200 else (
            "loading" if health_answer.status == 503 else f"HTTP {health_answer.status}"
        )  # fmt: skip
    slots = _json(answers, "/slots")
    busy = None
    if isinstance(slots, list):
        busy = sum(
            1
            for s in slots
            if isinstance(s, dict) and (s.get("is_processing") is True or s.get("state") == 1)
        )
    listed = _model_list(_json(answers, "/v1/models")) or []
    if not listed and _str(props.get("model_path")):
        listed = [{"id": props["model_path"]}]
    models = []
    for item in listed:
        meta = _sub(item, "meta")
        served_as = item["id"]
        models.append(
            {
                "id": _model_id(served_as),
                "runtime": "llama.cpp",
                "state": "loading" if health == "loading" else "loaded",
                "quantization": quantization_from_name(served_as),
                "parameters": _int(meta.get("n_params")),
                "context_length": _int(settings.get("n_ctx")) or _int(meta.get("n_ctx_train")),
                "chat_template": bool(props.get("chat_template")) if "chat_template" in props
                else None,
                "active": busy or 0,
                "served_as": served_as,
                "size": _int(meta.get("size")),
                "n_ctx_train": _int(meta.get("n_ctx_train")),
            }
        )  # fmt: skip
    total = _int(props.get("total_slots"))
    return Finding(
        "llama.cpp",
        f"llama.cpp server ({health}), {len(models)} model(s)"
        + ("" if total is None else f", {busy if busy is not None else '?'}/{total} slots busy"),
        server="llama.cpp",
        version=_str(props.get("build_info")),
        models=tuple(models),
        details={"health": health, "total_slots": total, "busy_slots": busy},
    )


# Fingerprints of OpenAI-compatible servers: (OpenAPI title substring, server).
_OPENAPI_TITLES: Final = (("llama.cpp python", "llama-cpp-python"), ("vllm", "vllm"))
_OWNERS: Final = {"vllm": "vllm", "llamacpp": "llama.cpp", "lmstudio": "lm-studio"}
# Servers that list only what they have loaded and ready.
_SERVES_LOADED: Final = frozenset({"llama-cpp-python", "vllm", "llama.cpp"})


def _openai(answers: Mapping[str, Outcome]) -> Finding:
    listing = answers["/v1/models"]
    items = _model_list(listing.json()) or []
    server = version = None
    openapi = _json(answers, "/openapi.json")
    info = openapi.get("info") if isinstance(openapi, dict) else None
    if isinstance(info, dict) and _str(info.get("title")):
        title = info["title"].lower()
        for needle, name in _OPENAPI_TITLES:
            if needle in title:
                server, version = name, _str(info.get("version"))
                break
    if server is None:
        owners = {str(m.get("owned_by", "")).lower() for m in items}
        server = next((_OWNERS[o] for o in owners if o in _OWNERS), None)
    if version is None:
        version = _str(_obj(answers, "/version").get("version"))
    state = "loaded" if server in _SERVES_LOADED else "available"
    models = [
        {
            "id": _model_id(m["id"]),
            "runtime": server or "openai",
            "state": state,
            "quantization": quantization_from_name(m["id"]),
            "context_length": _int(m.get("max_model_len")),
            "served_as": m["id"],
            "owned_by": _str(m.get("owned_by")),
        }
        for m in items
    ]
    header = listing.headers.get("server")
    what = {"llama-cpp-python": "llama-cpp-python (python -m llama_cpp.server)"}.get(
        server or "", server or "an OpenAI-compatible server"
    )
    if _needs_key(listing):
        reason = f"{what}: needs an API key to list its models (HTTP {listing.status})"
    else:
        reason = f"{what} {version or ''}".rstrip() + f", {len(models)} model(s)"
    return Finding(
        "openai",
        reason,
        server=server,
        version=version,
        models=tuple(models),
        details={"http_server": header, "needs_key": _needs_key(listing)},
    )


def _plain_http(answers: Mapping[str, Outcome]) -> Finding:
    first = next(iter(answers.values()))
    header = first.headers.get("server")
    statuses = ", ".join(f"{path} → {o.status}" for path, o in answers.items())
    return Finding(
        "http",
        f"an HTTP server of no kind qmesh knows ({header or 'no Server header'}; {statuses})",
        server=header,
        details={"statuses": {path: o.status for path, o in answers.items()}},
    )


_BUILDERS: Final = {
    "qmesh-gate": _gate,
    "qmesh-daemon": _daemon,
    "ollama": _ollama,
    "llama.cpp": _llamacpp,
    "openai": _openai,
}
