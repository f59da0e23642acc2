"""qmesh.fleet.probes, sans-IO: canned answers in, findings out — what each
kind of server looks like, and what garbage, silence and resets turn into."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmesh.fleet.probes import (
    PG_SSL_REQUEST,
    Finding,
    HttpExchange,
    Outcome,
    PgSslExchange,
    TargetProbe,
    parse_parameters,
    quantization_from_name,
)


def http(status: int, body: Any = b"", **headers: str) -> Outcome:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Outcome(status=status, headers=headers, body=data)


NOT_FOUND = http(404, {"detail": "Not Found"}, server="uvicorn")


def drive(answers: dict[str, Outcome], *, port: int = 8080, pg: Outcome | None = None) -> Finding:
    """Run a TargetProbe against a table of answers (missing paths: 404)."""
    probe = TargetProbe(f"10.0.0.5:{port}", port)
    asked: list[str] = []
    while (exchange := probe.next_exchange()) is not None:
        asked.append(exchange.path)
        if isinstance(exchange, PgSslExchange):
            probe.feed(pg or Outcome.failed("closed"))
        else:
            probe.feed(answers.get(exchange.path, NOT_FOUND))
    finding = probe.finding()
    finding.details["asked"] = asked
    return finding


# -- kinds -----------------------------------------------------------------------------------


def test_ollama_models_loaded_and_available() -> None:
    finding = drive(
        {
            "/api/version": http(200, {"version": "0.5.7"}),
            "/api/tags": http(200, {"models": [
                {"name": "llama3.2:1b", "size": 1_321_098_329, "digest": "baf6a787fdff",
                 "details": {"format": "gguf", "family": "llama", "parameter_size": "1.2B",
                             "quantization_level": "Q8_0"}},
                {"name": "qwen2.5:0.5b", "size": 397_821_319,
                 "details": {"family": "qwen2", "parameter_size": "494.03M",
                             "quantization_level": "Q4_K_M"}},
            ]}),
            "/api/ps": http(200, {"models": [
                {"name": "llama3.2:1b", "size_vram": 1_500_000_000, "context_length": 4096,
                 "expires_at": "2026-01-01T00:00:00Z", "details": {"family": "llama"}},
            ]}),
        }
    )  # fmt: skip
    assert (finding.kind, finding.server, finding.version) == ("ollama", "ollama", "0.5.7")
    models = {m["id"]: m for m in finding.models}
    assert models["llama3.2:1b"]["state"] == "loaded"
    assert models["llama3.2:1b"]["quantization"] == "Q8_0"
    assert models["llama3.2:1b"]["parameters"] == 1_200_000_000
    assert models["llama3.2:1b"]["context_length"] == 4096
    assert models["llama3.2:1b"]["size_vram"] == 1_500_000_000
    assert models["qwen2.5:0.5b"]["state"] == "available"
    assert models["qwen2.5:0.5b"]["parameters"] == 494_030_000
    assert "1 loaded" in finding.reason
    # Ollama also serves /v1/models; it was never asked, nor PostgreSQL.
    assert finding.details["asked"] == [
        "/healthz", "/api/version", "/api/tags", "/api/ps",
    ]  # fmt: skip


def test_llama_cpp_server() -> None:
    finding = drive(
        {
            "/props": http(200, {
                "default_generation_settings": {"n_ctx": 8192},
                "total_slots": 4, "chat_template": "{% for m in messages %}…",
                "model_path": "/m/qwen2.5-7b-q5_k_m.gguf", "build_info": "b4589-1a2b3c4",
            }),
            "/health": http(200, {"status": "ok"}),
            "/slots": http(200, [{"id": 0, "is_processing": True},
                                 {"id": 1, "is_processing": False},
                                 {"id": 2, "is_processing": True}, {"id": 3}]),
            "/v1/models": http(200, {"object": "list", "data": [
                {"id": "/m/qwen2.5-7b-q5_k_m.gguf", "owned_by": "llamacpp",
                 "meta": {"n_params": 7_615_616_512, "n_ctx_train": 32768, "size": 5_436_000_000}},
            ]}),
        }
    )  # fmt: skip
    assert (finding.kind, finding.server, finding.version) == (
        "llama.cpp",
        "llama.cpp",
        "b4589-1a2b3c4",
    )
    (model,) = finding.models
    assert model["id"] == "qwen2.5-7b-q5_k_m"  # named like the daemons' catalogs name it
    assert model["served_as"] == "/m/qwen2.5-7b-q5_k_m.gguf"
    assert (model["quantization"], model["parameters"], model["context_length"]) == (
        "Q5_K_M", 7_615_616_512, 8192
    )  # fmt: skip
    assert model["state"] == "loaded" and model["chat_template"] is True and model["active"] == 2
    assert finding.details["busy_slots"] == 2 and finding.details["total_slots"] == 4
    assert "2/4 slots busy" in finding.reason


def test_llama_cpp_still_loading() -> None:
    finding = drive(
        {
            "/props": http(200, {"total_slots": 1, "model_path": "/m/a-f16.gguf"}),
            "/health": http(503, {"error": {"code": 503, "message": "Loading model"}}),
            "/slots": http(501, {"error": "slots endpoint is disabled"}),
            "/v1/models": http(503, {"error": "loading"}),
        }
    )
    (model,) = finding.models
    assert (finding.kind, finding.details["health"]) == ("llama.cpp", "loading")
    assert (model["id"], model["state"], model["quantization"]) == ("a-f16", "loading", "F16")


def test_llama_cpp_python_is_an_openai_server_not_llama_cpp() -> None:
    """``python -m llama_cpp.server``: FastAPI, no /props, its model id is the path."""
    path = "/root/.cache/qmesh/models/gemma-3-270m-q4_k_m.gguf"
    finding = drive(
        {
            "/v1/models": http(200, {"object": "list", "data": [
                {"id": path, "object": "model", "owned_by": "me", "permissions": []}
            ]}, server="uvicorn"),
            "/openapi.json": http(200, {"openapi": "3.1.0", "info": {
                "title": "🦙 llama.cpp Python API", "version": "0.3.36"}}),
        }
    )  # fmt: skip
    assert (finding.kind, finding.server, finding.version) == (
        "openai", "llama-cpp-python", "0.3.36"
    )  # fmt: skip
    (model,) = finding.models
    assert (model["id"], model["served_as"], model["quantization"], model["state"]) == (
        "gemma-3-270m-q4_k_m", path, "Q4_K_M", "loaded"
    )  # fmt: skip
    assert finding.details["http_server"] == "uvicorn"


def test_vllm_and_plain_openai_servers() -> None:
    vllm = drive(
        {
            "/v1/models": http(200, {"data": [
                {"id": "Qwen/Qwen2.5-7B-Instruct-AWQ", "owned_by": "vllm", "max_model_len": 32768}
            ]}),
            "/version": http(200, {"version": "0.6.3"}),
        }
    )  # fmt: skip
    assert (vllm.kind, vllm.server, vllm.version) == ("openai", "vllm", "0.6.3")
    assert vllm.models[0]["context_length"] == 32768
    assert vllm.models[0]["id"] == "Qwen/Qwen2.5-7B-Instruct-AWQ"

    other = drive({"/v1/models": http(200, {"object": "list", "data": [{"id": "mistral"}]})})
    assert (other.kind, other.server, other.models[0]["state"]) == ("openai", None, "available")

    keyed = drive({"/v1/models": http(401, {"error": {"message": "Invalid API key"}})})
    assert keyed.kind == "openai" and keyed.details["needs_key"] and "API key" in keyed.reason


def test_qmesh_gate_and_daemon_health_ports() -> None:
    gate = drive({"/healthz": http(200, {"status": "ok", "version": "0.1.0", "sessions": 3})})
    assert (gate.kind, gate.version, gate.details["sessions"]) == ("qmesh-gate", "qmesh/0.1.0", 3)
    assert gate.details["asked"] == ["/healthz"]

    model = {"id": "gemma-3-270m-q4_k_m", "runtime": "llama.cpp", "state": "available",
             "quantization": "Q4_K_M"}  # fmt: skip
    daemon = drive(
        {
            "/healthz": http(200, {"status": "ok", "node": "gpu-1", "gate_connected": True}),
            "/api/node": http(200, {"node": "gpu-1", "version": "qmesh/0.1.0", "host": "box",
                                    "inventory": {"models": [model], "telemetry": {"host": {}}}}),
        }
    )  # fmt: skip
    assert (daemon.kind, daemon.details["node"], daemon.version) == (
        "qmesh-daemon", "gpu-1", "qmesh/0.1.0"
    )  # fmt: skip
    assert daemon.models == (model,) and daemon.telemetry == {"host": {}}


def test_some_other_http_server() -> None:
    finding = drive({}, port=80)
    assert (finding.kind, finding.server) == ("http", "uvicorn")
    assert "/v1/models → 404" in finding.reason
    assert "SSLRequest" not in finding.details["asked"]  # HTTP answered: no PostgreSQL probe


def test_shapes_that_only_look_alike_are_not_trusted() -> None:
    # /api/version with more than a version is not Ollama; a list is not a model list.
    finding = drive(
        {
            "/api/version": http(200, {"version": "1.0", "build": "x"}),
            "/props": http(200, ["not", "props"]),
            "/v1/models": http(200, {"data": "nope"}),
            "/healthz": http(200, [1, 2, 3]),
        }
    )
    assert finding.kind == "http"


# -- postgres, garbage, silence --------------------------------------------------------------------


def test_postgres_answers_ssl_request() -> None:
    for byte, ssl in ((b"S", True), (b"N", False)):
        exchange = PgSslExchange()
        assert exchange.start() == PG_SSL_REQUEST == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
        reply = exchange.feed(byte)
        assert reply is not None and reply.pg == byte.decode()
        probe = TargetProbe("db:5432", 5432)
        first = probe.next_exchange()
        assert isinstance(first, PgSslExchange)  # the PostgreSQL port is asked that first
        probe.feed(reply)
        assert probe.next_exchange() is None
        finding = probe.finding()
        assert (finding.kind, finding.details["ssl"]) == ("postgres", ssl)


def test_postgres_on_an_unusual_port_after_http_is_hung_up_on() -> None:
    # PostgreSQL closes on an HTTP request without a byte; SSLRequest then says 'N'.
    finding = drive({"/healthz": Outcome.failed("closed")}, port=15432, pg=Outcome(pg="N"))
    assert finding.kind == "postgres"
    assert finding.details["asked"] == ["/healthz", "SSLRequest"]


def test_postgres_first_when_it_was_postgres_last_time() -> None:
    probe = TargetProbe("db:15432", 15432, postgres_first=True)
    assert isinstance(probe.next_exchange(), PgSslExchange)


def test_garbage_is_unknown_with_what_it_sent() -> None:
    noise = b"\x8f\x00garbage\xff"
    finding = drive(
        {"/healthz": Outcome.failed("garbage", "illegal status line", noise)},
        pg=Outcome.failed("garbage", "not an answer", noise),
    )
    assert finding.kind == "unknown" and finding.alive and not finding.is_service
    assert repr(noise) in finding.reason and "neither HTTP nor PostgreSQL" in finding.reason
    assert finding.details["first_bytes"] == noise.hex()
    assert finding.details["asked"] == ["/healthz", "SSLRequest"]  # one try each, no more


def test_silence_reset_and_tls() -> None:
    silent = drive({"/healthz": Outcome.failed("timeout", "no complete answer within 1s")},
                   pg=Outcome.failed("timeout", "no answer within 1s"))  # fmt: skip
    assert silent.kind == "unknown" and "silence" in silent.reason

    reset = drive({"/healthz": Outcome.failed("reset")}, pg=Outcome.failed("reset"))
    assert reset.kind == "unknown" and "reset" in reset.reason

    tls = drive({"/healthz": Outcome.failed("garbage", "", b"\x15\x03\x03\x00\x02\x02\x50")})
    assert tls.kind == "unknown" and "TLS" in tls.reason


def test_nothing_listening_is_absent_and_asks_once() -> None:
    finding = drive({"/healthz": Outcome.failed("refused")})
    assert (finding.kind, finding.alive) == ("absent", False)
    assert finding.details["asked"] == ["/healthz"]
    assert "nothing listens" in finding.reason
    timeout = drive({"/healthz": Outcome.failed("connect_timeout", "1s")})
    assert timeout.kind == "absent" and "host down or filtered" in timeout.reason


def test_out_of_time_is_said() -> None:
    probe = TargetProbe("h:1", 1)
    probe.next_exchange()
    finding = probe.finding(out_of_time=10.0)
    assert finding.kind == "unknown" and "10s" in finding.reason


# -- the byte level --------------------------------------------------------------------------------


def test_http_exchange_byte_by_byte() -> None:
    exchange = HttpExchange("10.0.0.5:11434", "/api/version")
    request = exchange.start()
    assert request.startswith(b"GET /api/version HTTP/1.1\r\n")
    assert b"host: 10.0.0.5:11434" in request.lower() and b"connection: close" in request.lower()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
        b'{"version":"0.5.7"}\n'
    )
    outcomes = [exchange.feed(answer[i : i + 1]) for i in range(len(answer))]
    assert all(o is None for o in outcomes[:-1])
    final = outcomes[-1]
    assert final is not None and final.status == 200 and final.json() == {"version": "0.5.7"}


def test_http_exchange_until_close_and_limits() -> None:
    exchange = HttpExchange("h:1", "/")
    exchange.start()
    assert exchange.feed(b"HTTP/1.0 200 OK\r\n\r\nhello") is None
    done = exchange.feed(b"")  # HTTP/1.0: the body ends with the connection
    assert done is not None and done.body == b"hello"

    big = HttpExchange("h:1", "/", max_body=1000)
    big.start()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    result = big.feed(head + b"800\r\n" + b"x" * 0x800 + b"\r\n")
    assert result is not None and result.failure == "too_large" and result.status == 200

    endless = HttpExchange("h:1", "/")
    endless.start()
    # A head that never ends is cut off at the cap, not buffered forever.
    outcome = None
    for _ in range(100):
        outcome = endless.feed(b"X" * 1024)
        if outcome is not None:
            break
    assert outcome is not None and outcome.failure == "garbage"


def test_http_exchange_peer_behaviour() -> None:
    closed = HttpExchange("h:1", "/")
    closed.start()
    result = closed.feed(b"")
    assert result is not None and result.failure == "closed"

    garbage = HttpExchange("h:1", "/")
    garbage.start()
    result = garbage.feed(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert result is not None and result.failure == "garbage"
    assert result.first_bytes.startswith(b"SSH-2.0")

    partial = HttpExchange("h:1", "/")
    partial.start()
    assert partial.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") is None
    timed = partial.timed_out(1.0)
    assert timed.status == 200 and timed.failure == "timeout"
    broken = partial.feed(b"")
    assert broken is not None and broken.status == 200 and broken.failure == "closed"


def test_pg_exchange_rejects_longer_answers() -> None:
    exchange = PgSslExchange()
    result = exchange.feed(b"HTTP/1.1 400 Bad Request\r\n")
    assert result is not None and result.failure == "garbage"
    assert PgSslExchange().timed_out(1.0).failure == "timeout"


@given(st.binary(max_size=300))
def test_any_bytes_give_an_outcome_or_need_more(data: bytes) -> None:
    """Nothing a peer sends makes an exchange raise."""
    for exchange in (HttpExchange("h:1", "/x"), PgSslExchange()):
        exchange.start()
        result = exchange.feed(data)
        if result is None:
            result = exchange.feed(b"")
        assert isinstance(result, Outcome)


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("gemma-3-270m-q4_k_m.gguf", "Q4_K_M"),
        ("/models/Meta-Llama-3.1-8B-Instruct-Q8_0.gguf", "Q8_0"),
        ("mistral-7b-v0.1.Q5_K_S.gguf", "Q5_K_S"),
        ("phi-3-mini-iq2_xxs.gguf", "IQ2_XXS"),
        ("tinyllama-f16.gguf", "F16"),
        ("qwen2.5-bf16", "BF16"),
        ("llama3.2:1b", None),
        ("q4-without-suffix-ok.gguf", None),
    ],
)
def test_quantization_from_name(name: str, quant: str | None) -> None:
    assert quantization_from_name(name) == quant


def test_parse_parameters() -> None:
    assert parse_parameters("8.0B") == 8_000_000_000
    assert parse_parameters("270M") == 270_000_000
    assert parse_parameters("1.5T") == 1_500_000_000_000
    assert parse_parameters("8x7B") is None and parse_parameters(None) is None
