"""The read-only / statement_timeout statement check: what it refuses, what
it lets through, and that its lexer is not fooled by comments, quoting and
literals (the refusal itself is tested over real sessions in
test_pg_governance.py)."""

from __future__ import annotations

import pytest

from qmesh.pg.guard import check_statement, normalise, parameter_count, refusal_sql

REFUSED_WHEN_READ_ONLY = [
    "SET default_transaction_read_only = off",
    "set/**/default_transaction_read_only=off",
    'SET "DEFAULT_TRANSACTION_READ_ONLY" TO off',
    "SET SESSION default_transaction_read_only TO DEFAULT",
    "SET LOCAL transaction_read_only = off",
    "RESET default_transaction_read_only",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ\n  WRITE",
    "START TRANSACTION READ WRITE",
    "SET TRANSACTION READ WRITE",
    "begin /* x /* nested */ */ read -- c\n write",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_catalog.set_config($1, $2, false)",
    "UPDATE pg_settings SET setting = 'off' WHERE name = $1",
    "update pg_catalog.pg_settings set setting = 'off' where name = 'x'",
    "ALTER ROLE CURRENT_USER SET default_transaction_read_only = off",
    'SET U&"transaction\\005fread_only" = off',
    "DO $$BEGIN EXECUTE 'SET default_transaction_read_only = off'; END$$",
    "SELECT 'it''s -- not a comment'; SET default_transaction_read_only = off",
    "SELECT e'\\' -- ', 1; SET transaction_read_only = off",
    "SELECT $tag$ ' $tag$; BEGIN READ WRITE",
]

ALLOWED_WHEN_READ_ONLY = [
    "SELECT 1",
    "SHOW default_transaction_read_only",
    "SHOW transaction_read_only",
    "SELECT current_setting('transaction_read_only')",
    "SELECT current_setting('default_transaction_read_only', true)",
    "BEGIN READ ONLY",
    "BEGIN; SELECT 1; COMMIT",
    "SELECT a$b FROM t WHERE c = $1",
    "select abalance from pgbench_accounts where aid = $1",
    "SELECT set_config('search_path', 'app', false)",
    "SELECT 1 -- read write in a comment",
    "SELECT 1 /* set default_transaction_read_only */",
]


@pytest.mark.parametrize("sql", REFUSED_WHEN_READ_ONLY)
def test_refused_in_read_only_sessions(sql: str) -> None:
    refusal = check_statement(sql, read_only=True, guard_timeout=False)
    assert refusal is not None and refusal.sqlstate == "25006", normalise(sql)
    assert check_statement(sql, read_only=False, guard_timeout=False) is None


@pytest.mark.parametrize("sql", ALLOWED_WHEN_READ_ONLY)
def test_allowed_in_read_only_sessions(sql: str) -> None:
    assert check_statement(sql, read_only=True, guard_timeout=False) is None, normalise(sql)


def test_statement_timeout_guard() -> None:
    for sql in ("SET statement_timeout = 0", "set statement_timeout to '1h'",
                "SELECT set_config('statement_timeout', '0', false)"):  # fmt: skip
        refusal = check_statement(sql, read_only=False, guard_timeout=True)
        assert refusal is not None and refusal.sqlstate == "42501"
    for sql in ("SHOW statement_timeout", "RESET statement_timeout", "SELECT 1"):
        assert check_statement(sql, read_only=False, guard_timeout=True) is None


def test_normalise() -> None:
    assert normalise('SELECT \'A--b\' -- c\n, "Quoted""X" /* d */ FROM $q$ Z $q$') == (
        "select 'a--b' , quoted\"x from $q$ z $q$"
    )
    assert normalise("/* unterminated") == ""
    assert normalise("'unterminated") == "'unterminated"


def test_refusal_sql_and_parameters() -> None:
    refusal = check_statement("BEGIN READ WRITE", read_only=True, guard_timeout=False)
    assert refusal is not None
    sql = refusal_sql(refusal)
    assert sql.startswith("DO $qmesh$") and "ERRCODE = '25006'" in sql
    assert parameter_count("SELECT set_config($1, $2, false) -- $9x", 0) == 2
    assert parameter_count("SELECT '$5', $1", 0) == 1
    assert parameter_count("SELECT $1", 3) == 3
    assert parameter_count("SELECT a$1", 0) == 0
