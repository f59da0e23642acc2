"""qmesh.boundary: what one connection's failure may and may not do."""

from __future__ import annotations

import logging

import pytest

from qmesh.boundary import peer_boundary

log = logging.getLogger("test.boundary")


def test_a_bug_ends_only_the_connection_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    table: dict[str, int] = {}
    with peer_boundary("client 1", log):
        table["missing"] += 1  # a KeyError from a bug
    (record,) = caplog.records
    assert record.getMessage() == "client 1 ended by an unexpected KeyError"
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_what_belongs_to_someone_else_passes_through(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(KeyboardInterrupt), peer_boundary("client 2", log):
        raise KeyboardInterrupt
    assert caplog.records == []


def test_a_group_is_split_the_peers_part_ends_here(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BaseExceptionGroup) as info, peer_boundary("client 3", log):
        raise BaseExceptionGroup("both", [ValueError("bad input"), KeyboardInterrupt()])
    assert [type(e) for e in info.value.exceptions] == [KeyboardInterrupt]
    assert info.value.__suppress_context__  # the caught part is logged, not chained
    (record,) = caplog.records
    assert record.getMessage() == "client 3 ended by an unexpected ExceptionGroup"
    assert record.exc_info is not None
    assert [type(e) for e in record.exc_info[1].exceptions] == [ValueError]  # type: ignore[union-attr]


def test_nothing_raised_nothing_said(caplog: pytest.LogCaptureFixture) -> None:
    with peer_boundary("client 4", log):
        pass
    assert caplog.records == []


def test_a_description_with_arguments_is_formatted_only_for_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Peer:
        formatted = 0

        def __str__(self) -> str:
            Peer.formatted += 1
            return "50%s"  # a peer's text: never read as a format

    with peer_boundary("client %s on %d%%", log, Peer(), 7):
        pass
    assert Peer.formatted == 0
    with peer_boundary("client %s on %d%%", log, Peer(), 7):
        raise ValueError("bad input")
    (record,) = caplog.records
    assert record.getMessage() == "client 50%s on 7% ended by an unexpected ValueError"
    assert Peer.formatted == 1
