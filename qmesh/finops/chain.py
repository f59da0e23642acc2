"""HMAC hash chains over append-only tables, and their verification.

For: sealing each new row of ``qg_ledger`` / ``qg_audit`` with
``hash = HMAC-SHA256(chain key, prev_hash ‖ canonical(row))``, where the
canonical form is the row's id and data columns as compact JSON (as
``json.dumps`` writes them; ``qmesh._core`` seals, byte for byte the same,
with the GIL released); keeping
an authenticated head per chain (last id, last hash, row count) so that
removing the newest rows is caught; and :func:`verify_chain`, which walks
a table and reports every edited, inserted, deleted or reordered row.

Why an HMAC and not a bare hash: with a bare hash anyone who can write the
database can rewrite the whole chain after an edit and it verifies again.
The chain key is kept apart from the rows: on SQLite in a file beside the
database (``chain.key``, mode 0600); on PostgreSQL in the state itself,
sealed (AES-256-GCM) with the vault's master key, so every Gate holding the
master key can verify and extend the chains and a database dump alone
cannot forge them. What this cannot catch: an attacker with the key, or a
whole database rolled back to an older copy (head included) — keep the key
(or the master key) off the database host's backups for that.

Not for: what the rows mean (:mod:`qmesh.finops.ledger`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TypeAlias

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qmesh import _core
from qmesh.identity import write_private_file
from qmesh.masterkey import key_fingerprint
from qmesh.state import StateError, StateStore
from qmesh.state.db import Connection, insert_many

__all__ = [
    "CHAINS",
    "GENESIS",
    "ChainKeyMissing",
    "ChainProblem",
    "ChainReport",
    "Column",
    "append_rows",
    "chain_key_path",
    "load_chain_key",
    "reseal_chain_key",
    "seal_chain_key",
    "sealed_chain_key",
    "verify_chain",
    "write_chain_key_file",
]

GENESIS: Final = b"\x00" * 32
Column: TypeAlias = bool | int | float | str | None
"""What a chained table's data column holds (what its seal is computed over)."""
KEY_FILE: Final = "chain.key"
_NATIVE_SQLITE: Final = _core.native_sqlite()
"""Whether :func:`qmesh._core.insert_sealed` can write through this
interpreter's ``sqlite3`` connections (CPython 3.11 to 3.14)."""
CHAINS: Final = {
    "ledger": (
        "qg_ledger",
        (
            "ts",
            "request_id",
            "app",
            "budget",
            "task",
            "candidate",
            "kind",
            "model",
            "provider",
            "tokens_in",
            "tokens_out",
            "cost_usd",
            "shifted_from",
            "avoided_usd",
            "outcome",
            "hops",
            "reason",
        ),
    ),
    "audit": ("qg_audit", ("ts", "actor", "action", "detail")),
    "prompts": ("qg_prompts", ("ts", "request_id", "app", "kept", "prompt", "answer")),
}
"""Chain name → (table, data columns in hashing order)."""


def chain_key_path(db_path: Path) -> Path:
    return db_path.parent / KEY_FILE


class ChainKeyMissing(StateError):
    """The chain key is not there (nothing was ever written, or it was lost),
    or it cannot be opened with this master key."""


def load_chain_key(
    store: StateStore, *, master_key: bytes | None = None, create: bool = True
) -> bytes:
    """The chains' key: on SQLite the file beside the database, on
    PostgreSQL the state's sealed copy (``master_key`` required). Created on
    first use if ``create``; raises ChainKeyMissing otherwise."""
    if store.path is not None:
        return _key_file(store.path, create=create)
    if master_key is None:
        raise ChainKeyMissing(
            f"the ledger's chain key in {store.location} is sealed with the vault's master "
            "key, and none was given (gate.master_key_file or QMESH_MASTER_KEY)"
        )
    return _sealed_key(store, master_key, create=create)


def _key_file(db_path: Path, *, create: bool) -> bytes:
    path = chain_key_path(db_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise ChainKeyMissing(
                f"no chain key at {path}: nothing was ever written, or the key was lost "
                "(then the chains cannot be verified)"
            ) from None
        key = secrets.token_bytes(32)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key.hex().encode() + b"\n")
        data = path.read_bytes()
    return bytes.fromhex(data.decode().strip())


_KEY_AAD: Final = b"qmesh-state-key\x00chain"


def reseal_chain_key(conn: Connection, old_key: bytes, new_key: bytes) -> int:
    """On PostgreSQL's state (a SQLite state keeps the key in a file of its
    own, unsealed): seal the chain key again under ``new_key``, in the
    caller's write transaction (``qmesh secrets rekey``); 1 if there was one."""
    row = conn.execute("SELECT nonce, ciphertext FROM state_keys WHERE name = 'chain'").fetchone()
    if row is None:
        return 0
    try:
        key = AESGCM(old_key).decrypt(bytes(row[0]), bytes(row[1]), _KEY_AAD)
    except InvalidTag:
        raise ChainKeyMissing("the chain key is sealed with another master key") from None
    seal_chain_key(conn, key, new_key)
    return 1


def write_chain_key_file(db_path: Path, key: bytes, *, replace: bool = False) -> None:
    """Put ``key`` beside the SQLite state at ``db_path`` (a restore), 0600."""
    write_private_file(chain_key_path(db_path), key.hex().encode() + b"\n", replace=replace)


def sealed_chain_key(store: StateStore, master_key: bytes) -> bytes:
    """The chain key a store holds sealed (PostgreSQL's state, a backup);
    raises ChainKeyMissing when there is none or another master key sealed it."""
    return _sealed_key(store, master_key, create=False)


def seal_chain_key(conn: Connection, key: bytes, master_key: bytes) -> None:
    """Store ``key`` as the state's chain key, sealed with ``master_key``,
    replacing any (``qmesh state migrate`` moves a SQLite state's key file)."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(master_key).encrypt(nonce, key, _KEY_AAD)
    conn.execute("DELETE FROM state_keys WHERE name = 'chain'")
    conn.execute(
        "INSERT INTO state_keys (name, key_fingerprint, nonce, ciphertext, created_at)"
        " VALUES ('chain', ?, ?, ?, ?)",
        (key_fingerprint(master_key), nonce, sealed, time.time()),
    )


def _sealed_key(store: StateStore, master_key: bytes, *, create: bool) -> bytes:
    with store._read() as conn:
        row = conn.execute(
            "SELECT key_fingerprint, nonce, ciphertext FROM state_keys WHERE name = 'chain'"
        ).fetchone()
    if row is None:
        if not create:
            raise ChainKeyMissing(f"no chain key in {store.location}: nothing was ever written")
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(master_key).encrypt(nonce, secrets.token_bytes(32), _KEY_AAD)
        with store._write() as conn:
            # Two Gates starting together: the first one's key wins, both use it.
            conn.execute(
                "INSERT INTO state_keys (name, key_fingerprint, nonce, ciphertext, created_at)"
                " VALUES ('chain', ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (key_fingerprint(master_key), nonce, sealed, time.time()),
            )
        return _sealed_key(store, master_key, create=False)
    fingerprint, nonce, sealed = (bytes(value) for value in row)
    try:
        return AESGCM(master_key).decrypt(nonce, sealed, _KEY_AAD)
    except InvalidTag:
        ours = key_fingerprint(master_key).hex()[:16]
        raise ChainKeyMissing(
            f"the chain key in {store.location} is sealed with another master key "
            f"(fingerprint {fingerprint.hex()[:16]}, this one {ours})"
        ) from None


def _head_mac(key: bytes, chain: str, last_id: int, last_hash: bytes, rows: int) -> bytes:
    message = f"{chain}\x00{last_id}\x00{rows}\x00".encode() + last_hash
    return hmac.new(key, message, hashlib.sha256).digest()


def append_rows(
    conn: Connection,
    key: bytes,
    chain: str,
    rows: Sequence[Sequence[Column]],
    *,
    take_turns: bool = False,
) -> None:
    """Insert ``rows`` (data columns in :data:`CHAINS` order) into the
    chain's table, sealed, and move the head. Call inside a write
    transaction: the head read here must not change until it commits.
    ``take_turns``: hand the core on between statements (on SQLite; see
    :func:`qmesh.background.loop_takes_turns`)."""
    if not rows:
        return
    table, columns = CHAINS[chain]
    head = conn.execute(
        "SELECT last_id, last_hash, rows FROM qg_chain_heads WHERE chain = ?", (chain,)
    ).fetchone()
    last_id, prev, count = (0, GENESIS, 0) if head is None else (head[0], bytes(head[1]), head[2])
    # Ids are assigned here, not by the database, so the sealed id is the stored one.
    next_id = int(conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0])
    next_id = max(next_id, last_id) + 1
    insert = f"INSERT INTO {table} (id, {', '.join(columns)}, prev_hash, hash)"
    width = len(columns) + 3
    # This runs in a worker thread beside the event loop, which waits for
    # the GIL whenever this thread holds it: the rows are sealed in Rust with
    # the GIL released, and on SQLite inserted there too.
    if _NATIVE_SQLITE and isinstance(conn, sqlite3.Connection):
        prev = _core.insert_sealed(conn, insert, key, prev, next_id, rows, take_turns=take_turns)
    else:
        sealed, prev = _core.seal_rows(key, prev, next_id, rows)
        if len(sealed) != width * len(rows):
            raise ValueError(f"rows of the {chain} chain have {len(columns)} columns")
        insert_many(conn, insert, sealed, width)
    last_id = next_id + len(rows) - 1
    count += len(rows)
    mac = _head_mac(key, chain, last_id, prev, count)
    conn.execute(
        "INSERT INTO qg_chain_heads (chain, last_id, last_hash, rows, mac) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (chain) DO UPDATE SET last_id = excluded.last_id,"
        " last_hash = excluded.last_hash, rows = excluded.rows, mac = excluded.mac",
        (chain, last_id, prev, count, mac),
    )


@attrs.frozen
class ChainProblem:
    row_id: int | None
    problem: str


@attrs.frozen
class ChainReport:
    chain: str
    rows: int
    problems: tuple[ChainProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(conn: Connection, key: bytes, chain: str) -> ChainReport:
    """Walk the chain and report every row whose seal or link is wrong, and
    a head that does not match the last row (rows removed from the end)."""
    table, columns = CHAINS[chain]
    problems: list[ChainProblem] = []
    prev = GENESIS
    count = 0
    last_id = 0
    cursor = conn.execute(
        f"SELECT id, {', '.join(columns)}, prev_hash, hash FROM {table} ORDER BY id"
    )
    for row in cursor:
        row_id = int(row[0])
        values = row[1 : 1 + len(columns)]
        stored_prev, stored_hash = bytes(row[-2]), bytes(row[-1])
        count += 1
        if stored_prev != prev:
            problems.append(
                ChainProblem(
                    row_id, "does not follow the row before it (a row was deleted or inserted)"
                )
            )
        if not hmac.compare_digest(_core.seal_row(key, stored_prev, row_id, values), stored_hash):
            problems.append(ChainProblem(row_id, "contents do not match its seal (edited)"))
        prev = stored_hash
        last_id = row_id
    head = conn.execute(
        "SELECT last_id, last_hash, rows, mac FROM qg_chain_heads WHERE chain = ?", (chain,)
    ).fetchone()
    if head is None:
        if count:
            problems.append(ChainProblem(None, "the chain's head record is missing"))
    else:
        h_id, h_hash, h_rows, h_mac = int(head[0]), bytes(head[1]), int(head[2]), bytes(head[3])
        if not hmac.compare_digest(_head_mac(key, chain, h_id, h_hash, h_rows), bytes(h_mac)):
            problems.append(ChainProblem(None, "the chain's head record was altered"))
        if h_id != last_id or h_hash != prev or h_rows != count:
            problems.append(
                ChainProblem(
                    None,
                    f"the head says {h_rows} rows ending at id {h_id}; the table has {count} "
                    f"ending at id {last_id} (rows removed or added)",
                )
            )
    return ChainReport(chain=chain, rows=count, problems=tuple(problems))
