"""The operator's master key: the 32 bytes that seal every secret at rest.

It seals the vault's database credentials (:mod:`qmesh.pg.vault`), the
providers' API keys (:mod:`qmesh.llm.provider_keys`) and, on PostgreSQL,
the ledger's chain key (:mod:`qmesh.finops.chain`).

For: finding the key (``QMESH_MASTER_KEY``, else the file named by
``gate.master_key_file``, else ``DATA_DIR/master.key``), checking it (32
bytes; a file readable by its owner only), creating the file (``qmesh
secrets init-master-key``, ``qmesh up``) and a non-secret fingerprint that
tells one key from another in error messages.

Not for: encrypting anything (the stores above do) or key rotation.

The file holds the key as one line of base64, so that ``export
QMESH_MASTER_KEY=$(cat master.key)`` works; a file of exactly 32 raw bytes
is accepted too. A key, once loaded, is registered with
:func:`qmesh.logs.register_secret` so it cannot reach a log line.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from qmesh.config import Config
from qmesh.identity import write_private_file
from qmesh.logs import register_secret
from qmesh.state import StateError

__all__ = [
    "MASTER_KEY_ENV",
    "MASTER_KEY_FILE",
    "MASTER_KEY_LEN",
    "MasterKeyError",
    "create_master_key",
    "ensure_master_key",
    "key_fingerprint",
    "load_master_key",
    "master_key_path",
    "promote_master_key_file",
    "replace_master_key_file",
]


class MasterKeyError(StateError):
    """The master key is missing, unreadable, badly formed or too open."""


MASTER_KEY_LEN: Final = 32
MASTER_KEY_ENV: Final = "QMESH_MASTER_KEY"
MASTER_KEY_FILE: Final = "master.key"
_MAX_FILE_BYTES: Final = 1024


def key_fingerprint(master_key: bytes) -> bytes:
    """8 bytes that identify ``master_key`` without revealing it (an HMAC
    under the key of a fixed label: nothing about the key can be learnt
    from it except by trying keys, which 256 bits rule out)."""
    return hmac.new(master_key, b"qmesh vault key fingerprint v1", hashlib.sha256).digest()[:8]


def master_key_path(config: Config) -> Path:
    """Where the master key file is: ``gate.master_key_file`` or ``DATA_DIR/master.key``."""
    return config.gate.master_key_file or config.data_dir / MASTER_KEY_FILE


def _decode(data: bytes, where: str) -> bytes:
    if len(data) == MASTER_KEY_LEN:
        return data
    text = data.strip()
    try:
        # Standard or URL-safe alphabet, padding optional.
        text = text.replace(b"-", b"+").replace(b"_", b"/")
        key = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MasterKeyError(
            f"{where}: not a master key: expected {MASTER_KEY_LEN} bytes in base64"
        ) from None
    if len(key) != MASTER_KEY_LEN:
        raise MasterKeyError(
            f"{where}: not a master key: expected {MASTER_KEY_LEN} bytes in base64, "
            f"got {len(key)} bytes"
        )
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise MasterKeyError(
            f"no master key: {path} does not exist and {MASTER_KEY_ENV} is not set; "
            "create one with `qmesh secrets init-master-key`"
        ) from None
    except OSError as exc:
        raise MasterKeyError(f"cannot read master key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        # fstat on the open file, so the mode checked is that of the file read.
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise MasterKeyError(f"master key {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise MasterKeyError(
                f"master key {path} has mode {mode:04o}: it must be readable by its owner "
                f"only (chmod 600 {path})"
            )
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise MasterKeyError(f"{path}: not a master key: the file is too large")
    return _decode(data, str(path))


def _from_env(env: Mapping[str, str]) -> bytes | None:
    raw = env.get(MASTER_KEY_ENV)
    if raw is None:
        return None
    if not raw.strip():
        raise MasterKeyError(f"{MASTER_KEY_ENV} is set but empty")
    # _decode takes 32 raw bytes as a key; from the environment only base64 is meant.
    if len(raw.encode()) == MASTER_KEY_LEN:
        raise MasterKeyError(
            f"{MASTER_KEY_ENV}: not a master key: expected {MASTER_KEY_LEN} bytes in base64"
        )
    return _decode(raw.encode("utf-8", errors="replace"), MASTER_KEY_ENV)


def _loaded(key: bytes) -> bytes:
    register_secret(key)
    return key


COMMAND_TIMEOUT_S: Final = 30.0
_MAX_COMMAND_OUTPUT: Final = 4096


def _from_command(command: tuple[str, ...]) -> bytes:
    where = f"gate.master_key_command ({command[0]})"
    try:
        done = subprocess.run(
            list(command), capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MasterKeyError(f"{where} could not run: {exc}") from None
    if done.returncode != 0:
        # Its stderr may say why; its stdout might hold key material: never shown.
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise MasterKeyError(f"{where} failed with status {done.returncode}: {reason[0][:200]}")
    if len(done.stdout) > _MAX_COMMAND_OUTPUT:
        raise MasterKeyError(f"{where}: not a master key: the output is too long")
    return _decode(done.stdout, where)


def load_master_key(config: Config, *, env: Mapping[str, str] | None = None) -> bytes:
    """The master key from ``QMESH_MASTER_KEY`` (base64 of 32 bytes), from
    ``gate.master_key_command``'s output, or from :func:`master_key_path`.
    Raises :class:`MasterKeyError` saying what is missing or wrong; the
    message never contains the key."""
    key = _from_env(os.environ if env is None else env)
    if key is not None:
        return _loaded(key)
    if config.gate.master_key_command is not None:
        return _loaded(_from_command(config.gate.master_key_command))
    return _loaded(_read_key_file(master_key_path(config)))


def replace_master_key_file(path: Path, key: bytes) -> Path:
    """Write ``key`` as ``path`` + ``.new`` (0600, synced), for a rekey that
    then commits the re-sealed secrets and moves it over ``path`` with
    :func:`promote_master_key_file` — in that order, so that a crash in
    between leaves the new key on disk, never secrets sealed with a key that
    was not written."""
    new = path.with_name(path.name + ".new")
    new.unlink(missing_ok=True)
    write_private_file(new, base64.b64encode(key) + b"\n")
    fd = os.open(new, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return new


def promote_master_key_file(path: Path) -> None:
    """Move ``path.new`` over ``path`` (atomic: a reader sees one key or the other)."""
    os.replace(path.with_name(path.name + ".new"), path)


def create_master_key(path: Path) -> bytes:
    """Write a new random key to ``path`` (mode 0600 from the start) and
    return it. Refuses to overwrite: the secrets encrypted with the old key
    would be lost. Creates the parent directory (0700) if needed."""
    key = secrets.token_bytes(MASTER_KEY_LEN)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    # Written beside the target, then hard-linked into place: link() fails if
    # the name exists, so the file appears whole or not at all and an
    # existing key is never replaced, even by a concurrent `qmesh up`.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    write_private_file(temp, base64.b64encode(key) + b"\n")
    try:
        os.link(temp, path)
    except FileExistsError:
        raise MasterKeyError(
            f"{path} already exists; refusing to replace it (the vault's secrets are "
            "encrypted with it)"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return _loaded(key)


def ensure_master_key(data_dir: Path, *, env: Mapping[str, str] | None = None) -> bytes:
    """For ``qmesh up``: ``QMESH_MASTER_KEY`` if set, else ``DATA_DIR/master.key``,
    created on first use. A file that exists but is unusable is an error,
    never silently replaced."""
    key = _from_env(os.environ if env is None else env)
    if key is not None:
        return _loaded(key)
    path = data_dir / MASTER_KEY_FILE
    if not path.exists():
        # Two `qmesh up` racing: the loser's create fails, and it reads the winner's file.
        with contextlib.suppress(MasterKeyError):
            return create_master_key(path)
    return _loaded(_read_key_file(path))
