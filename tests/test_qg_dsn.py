"""The qg:// DSN parser: examples, error messages, and properties."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmesh.qg.dsn import BUILTIN_TASKS, KEYS, PREFERENCES, PRIVACY, Dsn, is_dsn, parse_dsn
from qmesh.qg.errors import DsnError


def test_examples() -> None:
    assert parse_dsn("qg://task=summarize;prefer=speed") == Dsn(task="summarize", prefer="speed")
    dsn = parse_dsn(
        " qg://task=chat; model=gemma3 ;max_cost=0.002;max_latency_ms=800;"
        "privacy=private;budget=team-a;context=4096; "
    )
    assert dsn == Dsn(
        task="chat",
        model="gemma3",
        max_cost=0.002,
        max_latency_ms=800,
        privacy="private",
        budget="team-a",
        context=4096,
    )
    assert parse_dsn("QG://model=org/m%3Ax") == Dsn(model="org/m:x")
    assert parse_dsn("qg://prefer=local").task == "chat"


@pytest.mark.parametrize(
    ("text", "needle", "suggestion"),
    [
        ("qg://taks=summarize", "unknown key 'taks'", "task"),
        ("qg://task=sumarize", "unknown task 'sumarize'", "summarize"),
        ("qg://task=summarize;prefer=sped", "prefer='sped' is not one of", "speed"),
        ("qg://task=chat;privacy=locl", "privacy='locl'", "local"),
        ("qg://max_cost=-1", "max_cost must not be negative", None),
        ("qg://max_cost=abc", "max_cost must be a number", None),
        ("qg://max_cost=nan", "finite", None),
        ("qg://context=0", "context must be from 1", None),
        ("qg://context=1.5", "whole number of tokens", None),
        ("qg://max_latency_ms=-3", "whole number of milliseconds", None),
        ("qg://task=chat;task=code", "duplicate key 'task'", None),
        ("qg://", "empty DSN", None),
        ("qg://;;", "empty DSN", None),
        ("qg://task", "not a key=value pair", "task"),
        ("qg://task=", "task has an empty value", None),
        ("qg:/task=chat", "start with 'qg://'", "qg://task=chat"),
        ("qg://Task=chat", "not a valid key", "task"),
        ("qg://model=a b", "not a model family or id", None),
    ],
)
def test_errors_name_the_problem(text: str, needle: str, suggestion: str | None) -> None:
    with pytest.raises(DsnError) as info:
        parse_dsn(text)
    assert needle in str(info.value)
    assert info.value.suggestion == suggestion
    if suggestion:
        assert f"did you mean {suggestion!r}" in str(info.value)


def test_extra_tasks_from_config() -> None:
    assert parse_dsn("qg://task=legal_review", tasks=(*BUILTIN_TASKS, "legal_review")).task == (
        "legal_review"
    )
    with pytest.raises(DsnError, match="unknown task"):
        parse_dsn("qg://task=legal_review")


def test_is_dsn() -> None:
    assert is_dsn("qg://task=chat") and is_dsn("QG:/x")
    assert not is_dsn("gemma3-270m") and not is_dsn("")


# -- properties -----------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
dsns = st.builds(
    Dsn,
    task=st.sampled_from(BUILTIN_TASKS),
    prefer=st.sampled_from(PREFERENCES),
    model=st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,30}", fullmatch=True),
    max_cost=st.none()
    | st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    max_latency_ms=st.none() | st.integers(1, 86_400_000),
    privacy=st.sampled_from(PRIVACY),
    budget=st.none() | names,
    context=st.none() | st.integers(1, 100_000_000),
)


@given(dsns)
def test_format_round_trips(dsn: Dsn) -> None:
    assert parse_dsn(dsn.format()) == dsn


@given(dsns, st.randoms())
def test_key_order_and_spacing_do_not_matter(dsn: Dsn, rnd: object) -> None:
    parts = dsn.format()[5:].split(";")
    rnd.shuffle(parts)  # type: ignore[attr-defined]
    assert parse_dsn("qg://" + " ; ".join(parts) + ";") == dsn


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_dsn_error(text: str) -> None:
    try:
        parse_dsn(text)
    except DsnError as exc:
        assert str(exc).startswith("invalid qg:// DSN: ")


@given(st.text(alphabet=string.printable, max_size=80))
def test_arbitrary_text_after_scheme(text: str) -> None:
    try:
        parse_dsn("qg://" + text)
    except DsnError as exc:
        assert str(exc).startswith("invalid qg:// DSN: ")


@given(st.sampled_from(KEYS), st.integers(0, 100), st.sampled_from(string.ascii_lowercase))
def test_one_letter_typo_in_a_key_is_suggested(key: str, where: int, letter: str) -> None:
    i = where % len(key)
    typo = key[:i] + letter + key[i + 1 :]
    if typo in KEYS:
        return
    with pytest.raises(DsnError) as info:
        parse_dsn(f"qg://{typo}=1")
    assert info.value.key == typo
    assert info.value.suggestion == key or (
        # a short key can be one letter from two keys; any real key is fine
        info.value.suggestion in KEYS
    )


@given(st.sampled_from(KEYS))
def test_duplicate_keys_are_refused(key: str) -> None:
    values = {"task": "chat", "prefer": "speed", "privacy": "any"}
    value = values.get(key, "1")
    with pytest.raises(DsnError, match=f"duplicate key '{key}'"):
        parse_dsn(f"qg://{key}={value};{key}={value}")
