"""Secrets: the at-rest encryption keys, the blind-index key and the pseudonymisation key.

A keyring is JSON:

    {"active": 2,
     "encryption": {"1": "<base64 of 32 bytes>", "2": "<base64 of 32 bytes>"},
     "index": "<base64 of 32 bytes>",
     "pseudonym": "<base64 of 32 bytes>"}

It comes from the environment (`env:NAME`), a file (`file:/path`), or, on the embedded
default, a file generated on first start under `<data_dir>/secrets/` with mode 0600.
Keys beside the data they protect defend only against a leaked database file, hence the
warning: production keeps the keyring elsewhere. Rotation adds a key and makes it active;
old keys stay to decrypt what they wrote (each ciphertext carries its key id).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tomlsections.reader import ConfigError

KEY_BYTES = 32
_TEMP_ATTEMPTS = 8  # random 128-bit names: a second try means someone planted files
log = logging.getLogger("softrelay.privacy")


@dataclass(frozen=True, slots=True)
class Keyring:
    active: int
    encryption: dict[int, bytes]
    index: bytes
    pseudonym: bytes

    @classmethod
    def generate(cls) -> Keyring:
        return cls(
            active=1,
            encryption={1: secrets.token_bytes(KEY_BYTES)},
            index=secrets.token_bytes(KEY_BYTES),
            pseudonym=secrets.token_bytes(KEY_BYTES),
        )

    def rotated(self) -> Keyring:
        new_id = max(self.encryption) + 1
        keys = {**self.encryption, new_id: secrets.token_bytes(KEY_BYTES)}
        return Keyring(new_id, keys, self.index, self.pseudonym)

    def to_json(self) -> bytes:
        def b64(key: bytes) -> str:
            return base64.b64encode(key).decode()

        return orjson.dumps(
            {
                "active": self.active,
                "encryption": {str(k): b64(v) for k, v in sorted(self.encryption.items())},
                "index": b64(self.index),
                "pseudonym": b64(self.pseudonym),
            },
            option=orjson.OPT_INDENT_2,
        )


def parse_keyring(raw: bytes | str, origin: str) -> Keyring:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(origin, "", "keyring is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ConfigError(origin, "", "keyring must be a JSON object")
    unknown = sorted(set(data) - {"active", "encryption", "index", "pseudonym"})
    if unknown:
        raise ConfigError(origin, unknown[0], "unknown key")
    enc = data.get("encryption")
    if not isinstance(enc, dict) or not enc:
        raise ConfigError(origin, "encryption", "needs at least one key")
    try:
        encryption = {
            int(kid): _key(value, origin, f"encryption.{kid}") for kid, value in enc.items()
        }
    except ValueError:
        raise ConfigError(origin, "encryption", "key ids are integers") from None
    # Two bytes in every ciphertext; 0 marks the row-bound format (privacy/crypto.py).
    if not all(0 < kid < 2**16 for kid in encryption):
        raise ConfigError(origin, "encryption", "key ids are between 1 and 65535")
    active = data.get("active")
    if not isinstance(active, int) or active not in encryption:
        raise ConfigError(origin, "active", "must name one of the encryption key ids")
    return Keyring(
        active=active,
        encryption=encryption,
        index=_key(data.get("index"), origin, "index"),
        pseudonym=_key(data.get("pseudonym"), origin, "pseudonym"),
    )


def _key(value: Any, origin: str, key: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except binascii.Error:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigError(origin, key, f"must be base64 of {KEY_BYTES} random bytes")
    return raw


def load_keyring(source: str, data_dir: Path) -> Keyring:
    """Load from `env:NAME`, `file:PATH`, or generate under data_dir when source is empty."""
    if source.startswith("env:"):
        name = source[4:]
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"environment variable {name}", "", "is not set")
        return parse_keyring(value, f"environment variable {name}")
    if source.startswith("file:"):
        path = Path(source[5:])
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(path, "", f"cannot read keyring: {exc.strerror}") from None
        if path.stat().st_mode & 0o077:
            log.warning("keyring file is readable by group or others", extra={"fields": {}})
        return parse_keyring(raw, str(path))
    if source:
        raise ConfigError("keyring", "", "must be 'env:NAME', 'file:PATH' or empty")
    return _embedded_keyring(data_dir)


def embedded_keyring_path(data_dir: Path) -> Path:
    return data_dir / "secrets" / "keyring.json"


def _embedded_keyring(data_dir: Path) -> Keyring:
    path = embedded_keyring_path(data_dir)
    if path.exists():
        return parse_keyring(path.read_bytes(), str(path))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = Keyring.generate()
    try:
        _publish(keyring.to_json(), path, replace=False)
    except FileExistsError:
        # Another instance starting at the same moment published its keyring first:
        # use that one, so both encrypt with the same keys.
        if path.is_symlink():
            raise ConfigError(path, "", "is a symbolic link; refusing to use it") from None
        return parse_keyring(path.read_bytes(), str(path))
    log.warning(
        "generated a keyring beside the data; production keeps it elsewhere (secrets.keyring)",
        extra={"fields": {}},
    )
    return keyring


def write_keyring(keyring: Keyring, path: Path) -> None:
    """Replace a keyring file atomically, keeping mode 0600."""
    _publish(keyring.to_json(), path, replace=True)


def _publish(data: bytes, path: Path, *, replace: bool) -> None:
    """Write `data` to a fresh private file beside `path`, make it durable, then move it
    into place: renamed over `path` (`replace`), or linked only if `path` does not exist
    (FileExistsError otherwise), so a reader never sees half a keyring.

    The temporary file gets a random name and is created with O_EXCL|O_NOFOLLOW: a file
    or symlink planted in the directory is never opened, truncated or written through.
    """
    directory = path.parent
    fd, tmp = _create_private(directory, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path, follow_symlinks=False)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _create_private(directory: Path, name: str) -> tuple[int, Path]:
    """A new file only this user can read, under a name nobody could have guessed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = directory / f".{name}.{_temp_suffix()}.tmp"
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue  # taken (by chance, or planted): another random name
    raise FileExistsError(f"no free temporary name in {directory} after {_TEMP_ATTEMPTS} tries")


def _temp_suffix() -> str:
    return secrets.token_hex(16)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
