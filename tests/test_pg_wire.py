"""The Postgres wire parser as Python sees it (``qmesh._core``'s ``Pg*``):
the batch scanner's boundaries do not depend on how bytes are split, size
caps hold from the header alone, huge pass-through messages are never
buffered, and the field parsers and builders agree."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmesh import _core

FRONTEND = _core.PG_FRONTEND_TAGS
BACKEND = _core.PG_BACKEND_TAGS


def message(tag: bytes, body: bytes) -> bytes:
    return _core.encode_message(tag[0], body)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bool, list[bytes], bytes, bytes, bool, int, list[int]]:
    frontend = draw(st.booleans())
    tags = FRONTEND if frontend else BACKEND
    msgs = draw(
        st.lists(
            st.tuples(st.sampled_from(list(tags)), st.integers(0, 3000), st.integers(0, 255)),
            max_size=30,
        )
    )
    raws = [_core.encode_message(t, bytes([fill]) * n) for t, n, fill in msgs]
    full = bytes(draw(st.sets(st.sampled_from(list(tags)))))
    peek = bytes(draw(st.sets(st.sampled_from(list(tags)))))
    relay = draw(st.booleans())
    peek_max = draw(st.sampled_from([0, 1, 7, 64, 1024]))
    total = sum(map(len, raws))
    cuts = sorted(draw(st.lists(st.integers(0, max(total, 0)), max_size=20)))
    return frontend, raws, full, peek, relay, peek_max, cuts


@given(streams())
@settings(max_examples=200, deadline=None)
def test_events_do_not_depend_on_the_split(
    case: tuple[bool, list[bytes], bytes, bytes, bool, int, list[int]],
) -> None:
    frontend, raws, full, peek, relay, peek_max, cuts = case
    data = b"".join(raws)

    def scan(pieces: list[bytes]) -> list[tuple[int, bytes]]:
        scanner = _core.PgScanner(
            frontend=frontend, full=full, peek=peek, relay=relay, peek_max=peek_max
        )
        events: list[tuple[int, bytes]] = []
        for piece in pieces:
            events += scanner.feed(piece)
        scanner.eof()
        assert scanner.messages == len(raws) and scanner.buffered == 0
        return events

    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    split, whole = scan(pieces), scan([data])
    reported = [e for e in whole if e[0] != 0]
    assert [e for e in split if e[0] != 0] == reported
    expected = []
    for raw in raws:
        body = len(raw) - 5
        if raw[0] in full or (raw[0] in peek and body <= peek_max):
            expected.append((raw[0], raw))
        elif raw[0] in peek:
            expected.append((raw[0], raw[: 5 + peek_max]))
    assert reported == expected
    if relay:
        assert b"".join(raw for _, raw in split) == data
    else:
        assert all(tag != 0 for tag, _ in split)


def test_hostile_lengths_fail_from_the_header() -> None:
    scanner = _core.PgScanner(frontend=True, full=b"Q")
    with pytest.raises(_core.PgMessageTooLarge, match="1073741824"):
        scanner.feed(b"Q\x40\x00\x00\x00")
    with pytest.raises(_core.PgMessageTooLarge):  # poisoned
        scanner.feed(b"")
    with pytest.raises(_core.PgMalformed, match="invalid frontend message type 'T'"):
        _core.PgScanner(frontend=True).feed(b"T\x00\x00\x00\x04")
    with pytest.raises(_core.PgMalformed, match="below 4"):
        _core.PgScanner(frontend=False).feed(b"Z\x00\x00\x00\x03")
    with pytest.raises(ValueError):
        _core.PgScanner(frontend=True, max_message=2**31)
    truncated = _core.PgScanner(frontend=True)
    truncated.feed(b"Q\x00\x00\x00\x10sel")
    assert truncated.in_message
    with pytest.raises(_core.PgTruncated):
        truncated.eof()


def test_a_64_mib_hex_datarow_passes_without_being_buffered() -> None:
    """A 32 MiB bytea in text format is a 64 MiB+ DataRow: under the default
    limit, and skipped (never copied) when DataRow is not asked for."""
    body_len = 2 + 4 + 2 + 64 * 1024 * 1024
    header = b"D" + struct.pack(">I", body_len + 4)
    scanner = _core.PgScanner(frontend=False, full=b"CZ")
    assert scanner.feed(header + struct.pack(">hI", 1, body_len - 6) + b"\\x") == []
    chunk = b"ab" * 32768
    sent = 8
    while sent + len(chunk) <= body_len:
        assert scanner.feed(chunk) == []
        assert scanner.buffered == 0
        sent += len(chunk)
    scanner.feed(b"0" * (body_len - sent))
    tail = message(b"C", b"SELECT 1\x00") + message(b"Z", b"I")
    assert [tag for tag, _ in scanner.feed(tail)] == [ord("C"), ord("Z")]
    assert scanner.messages == 3


def test_a_70_mib_query_is_reported_whole() -> None:
    sql = b"SELECT '" + b"x" * (70 * 1024 * 1024) + b"'"
    raw = _core.encode_query(sql.decode())
    scanner = _core.PgScanner(frontend=True, full=b"Q", relay=True)
    events = []
    for i in range(0, len(raw), 256 * 1024):
        events += scanner.feed(raw[i : i + 256 * 1024])
    assert events == [(ord("Q"), raw)]
    assert _core.parse_query(raw[5:]) == sql


def test_changing_the_classes_between_feeds() -> None:
    scanner = _core.PgScanner(frontend=False, full=_core.PG_BACKEND_TAGS)
    login = message(b"R", b"\x00\x00\x00\x00") + message(b"Z", b"I")
    later = message(b"D", b"\x00\x00") + message(b"Z", b"I")
    assert [t for t, _ in scanner.feed(login + later[:3])] == [ord("R"), ord("Z")]
    scanner.full = b"Z"
    assert scanner.full == b"Z"
    # The DataRow's header was not complete when the classes changed: it is
    # classified under the new ones.
    assert [t for t, _ in scanner.feed(later[3:])] == [ord("Z")]


def test_startup_packets() -> None:
    startup = _core.encode_startup([("user", "shop"), ("database", "main"), ("options", "-c x=1")])
    packet = _core.parse_startup(startup + b"Q\x00")
    assert packet is not None and packet.kind == "startup" and packet.length == len(startup)
    assert packet.params == [("user", "shop"), ("database", "main"), ("options", "-c x=1")]
    assert packet.version == _core.PG_PROTOCOL_3_0
    assert _core.parse_startup(startup[:-1]) is None
    ssl_packet = _core.parse_startup(_core.PG_SSL_REQUEST)
    assert ssl_packet is not None and ssl_packet.kind == "ssl"
    gss_packet = _core.parse_startup(_core.PG_GSSENC_REQUEST)
    assert gss_packet is not None and gss_packet.kind == "gssenc"
    cancel = _core.parse_startup(_core.encode_cancel_request(77, b"\x01\x02\x03\x04"))
    assert cancel is not None and (cancel.kind, cancel.pid, cancel.secret) == (
        "cancel", 77, b"\x01\x02\x03\x04",
    )  # fmt: skip
    assert "\\x01" not in repr(cancel)  # the cancel key is a capability
    with pytest.raises(_core.PgMessageTooLarge):
        _core.parse_startup(b"\x00\x01\x00\x00")
    with pytest.raises(_core.PgMalformed, match="unsupported protocol"):
        _core.parse_startup(b"\x00\x00\x00\x08\x00\x02\x00\x00")


def test_field_parsers_and_builders_agree() -> None:
    parse = _core.encode_parse(b"s1", "SELECT $1::int", [23])
    assert _core.parse_parse(parse[5:]) == (b"s1", b"SELECT $1::int", [23])
    bind = message(b"B", b"p1\x00s1\x00\x00\x01\x00\x01\x00\x01\x00\x00\x00\x017\x00\x00")
    assert _core.parse_bind(bind[5:]) == (b"p1", b"s1", [1], [b"7"], [])
    assert _core.parse_bind_names(bind[5:11]) == (b"p1", b"s1")
    assert _core.parse_bind_names(bind[5:7]) is None
    assert _core.parse_execute(b"p1\x00\x00\x00\x00\x05") == (b"p1", 5)
    assert _core.parse_close(b"Sname\x00") == ("S", b"name")
    assert _core.parse_describe(b"P\x00") == ("P", b"")
    error = _core.encode_error_response([("S", "ERROR"), ("C", "42P01"), ("M", "no table")])
    assert _core.parse_error_fields(error[5:]) == {"S": "ERROR", "C": "42P01", "M": "no table"}
    assert _core.parse_command_complete(b"INSERT 0 12\x00") == ("INSERT 0 12", 12)
    assert _core.parse_command_complete(b"BEGIN\x00") == ("BEGIN", None)
    assert _core.parse_ready_for_query(b"T") == "T"
    status = _core.encode_parameter_status("TimeZone", "UTC")
    assert _core.parse_parameter_status(status[5:]) == ("TimeZone", "UTC")
    key = _core.encode_backend_key_data(4242, b"\x00\x01\x02\x03")
    assert _core.parse_backend_key_data(key[5:]) == (4242, b"\x00\x01\x02\x03")
    sasl = _core.encode_authentication(10, b"SCRAM-SHA-256\x00\x00")
    assert _core.parse_authentication(sasl[5:]) == (10, b"SCRAM-SHA-256\x00\x00")
    assert _core.parse_sasl_mechanisms(sasl[5:]) == ["SCRAM-SHA-256"]
    initial = _core.encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x")
    assert _core.parse_sasl_initial_response(initial[5:]) == ("SCRAM-SHA-256", b"n,,n=,r=x")
    assert _core.parse_notification(b"\x00\x00\x00\x07chan\x00hi\x00") == (7, "chan", "hi")
    assert _core.parse_data_row(b"\x00\x02\x00\x00\x00\x01a\xff\xff\xff\xff") == [b"a", None]
    row = b"\x00\x01id\x00" + b"\x00" * 4 + b"\x00\x01" + b"\x00\x00\x00\x17" + b"\x00\x04"
    row += b"\xff\xff\xff\xff\x00\x00"
    assert _core.parse_row_description(row) == [("id", 0, 1, 23, 4, -1, 0)]
    assert _core.parse_copy_response(b"\x00\x00\x02\x00\x00\x00\x00") == (0, [0, 0])
    assert _core.parse_function_call(b"\x00\x00\x08\x1e\x00\x00\x00\x00\x00\x00") == 2078
    negotiate = _core.encode_negotiate_protocol_version(0, ["_pq_.x"])
    assert _core.parse_negotiate_protocol_version(negotiate[5:]) == (0, ["_pq_.x"])
    assert _core.parse_password(b"secret\x00") == b"secret"
    # Client text comes back as the client sent it, whatever its encoding;
    # the server's is read as UTF-8 with replacements, never an error.
    assert _core.parse_query("héllo\x00".encode()) == "héllo".encode()
    assert _core.parse_query(b"\xff\x00") == b"\xff"
    assert _core.parse_close(b"P\xfe\xff\x00") == ("P", b"\xfe\xff")
    assert _core.parse_command_complete(b"\xffOK\x00") == ("\ufffdOK", None)


@pytest.mark.parametrize(
    ("parser", "body"),
    [
        (_core.parse_query, b"no terminator"),
        (_core.parse_parse, b"s\x00q\x00\x7f\xff"),  # 32767 types in no bytes
        (_core.parse_bind, b"\x00\x00\xff\xff"),  # a negative count
        (_core.parse_execute, b"p\x00\x00"),
        (_core.parse_close, b"Xn\x00"),
        (_core.parse_error_fields, b"Cx\x00"),
        (_core.parse_ready_for_query, b"Q"),
        (_core.parse_backend_key_data, b"\x00\x00"),
        (_core.parse_data_row, b"\x00\x01\x00\x00\x10\x00"),
        (_core.parse_sasl_mechanisms, b"\x00\x00\x00\x00"),
    ],
)
def test_field_parsers_refuse_malformed_bodies(parser: object, body: bytes) -> None:
    with pytest.raises(_core.PgMalformed):
        parser(body)  # type: ignore[operator]


def test_builders_refuse_what_the_protocol_cannot_carry() -> None:
    with pytest.raises(ValueError, match="NUL"):
        _core.encode_query("a\x00b")
    with pytest.raises(ValueError):
        _core.encode_error_response([("CC", "x")])
    with pytest.raises(ValueError):
        _core.encode_cancel_request(1, b"\x01")
    with pytest.raises(ValueError):
        _core.encode_ready_for_query("X")
