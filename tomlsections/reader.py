"""Strict reading of TOML declarations (the server configuration and the data policy).

Every value is read through a `Section`, which knows the file and the dotted key it
came from, so every error names both. `Section.finish()` rejects any key that was not
read: a typo in a configuration must stop the start, not be ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
# The repository's config/, installed as this package (pyproject.toml says why).
SHIPPED_PACKAGE = "softrelay_config"
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MISSING: Any = object()


def shipped(name: str) -> Path:
    """A file or folder of the shipped configuration (`softrelay.toml`, `policy`): in
    the checkout's config/ under `pip install -e`, in site-packages from a wheel."""
    found = files(SHIPPED_PACKAGE) / name
    # pip installs a wheel's files as files; only a zip import would give another kind.
    if not isinstance(found, Path):
        raise TypeError(f"{SHIPPED_PACKAGE} is not installed as files: {found}")
    return found


def resolve_secret(source: str, file: Path | str, key: str) -> str:
    """The value of `env:NAME` (an environment variable) or `file:PATH` (a file's text,
    stripped); a ConfigError naming `file` and `key` when it is missing or empty."""
    kind, _, where = source.partition(":")
    if kind == "env":
        value = os.environ.get(where, "")
        if not value:
            raise ConfigError(file, key, f"environment variable {where} is not set")
        return value
    if kind == "file":
        try:
            value = Path(where).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(file, key, f"cannot read {where}: {exc.strerror}") from None
        if not value:
            raise ConfigError(file, key, f"{where} is empty")
        return value
    raise ConfigError(file, key, "must be 'env:NAME' or 'file:PATH'")


class ConfigError(Exception):
    """A declaration that cannot work. The message names the file and the key."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {message}")


def parse_duration(text: str, file: Path | str, key: str) -> int:
    """'90d' -> seconds. Units: s, m, h, d, w."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(file, key, f"expected a duration like '7d' or '12h', got {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: int) -> str:
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def load_toml(path: Path) -> Section:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from exc
    return Section(data, path, "")


class Deferred(Generic[T]):
    """A section parsed when it is first asked for, then kept: for sections whose
    parsing reads secrets (`env:`/`file:` sources, key files), so that a command which
    never uses them needs none of them (`policy render` on a desk without the PBX
    secrets). Its ConfigError, naming file and key, comes at that first use."""

    def __init__(self, section: Section, parse: Callable[[Section], T]) -> None:
        self._section = section
        self._parse = parse
        self._value: list[T] = []  # empty until parsed

    def get(self) -> T:
        if not self._value:
            self._value.append(self._parse(self._section))
        return self._value[0]


class Section:
    """One TOML table, read key by key."""

    def __init__(self, data: dict[str, Any], file: Path, prefix: str) -> None:
        self._data = data
        self._seen: set[str] = set()
        self.file = file
        self.prefix = prefix

    def key(self, name: str) -> str:
        if not name:
            return self.prefix
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def secret(self, name: str, default: Any = _MISSING) -> str:
        """A secret named by `env:NAME` or `file:PATH` (never the secret itself: the
        configuration is no place for it), read now; "" when left empty."""
        source = self.text(name, default)
        return resolve_secret(source, self.file, self.key(name)) if source else ""

    def secret_source(self, name: str, default: Any = _MISSING) -> str:
        """Where a secret comes from, `env:NAME` or `file:PATH` ("" when left empty),
        checked but not read: the command that uses the secret reads it."""
        source = self.text(name, default)
        if source and not source.startswith(("env:", "file:")):
            raise self.error(name, "must be 'env:NAME' or 'file:PATH'")
        return source

    def has(self, name: str) -> bool:
        return name in self._data

    def names(self) -> Iterator[str]:
        return iter(list(self._data))

    def _get(self, name: str, default: Any) -> Any:
        self._seen.add(name)
        if name in self._data:
            return self._data[name]
        if default is _MISSING:
            raise self.error(name, "is missing, and has no default")
        return default

    def _typed(self, name: str, default: Any, kind: type | tuple[type, ...], label: str) -> Any:
        value = self._get(name, default)
        # bool is an int in Python; a TOML `true` is never a valid number here.
        if isinstance(value, bool) and kind is not bool:
            raise self.error(name, f"expected {label}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {label}, got {value!r}")
        return value

    def text(self, name: str, default: Any = _MISSING) -> str:
        value: str = self._typed(name, default, str, "a string")
        return value

    def address(self, name: str, default: Any = _MISSING) -> tuple[str, int] | None:
        """`IP:PORT` (an IPv6 address in brackets; port 0 picks a free one), or None
        for an empty string."""
        text = self.text(name, default)
        if not text:
            return None
        host, sep, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        try:
            ipaddress.ip_address(host)
            number = int(port)
        except ValueError:
            number = -1
        if not sep or not 0 <= number <= 65535:
            raise self.error(name, f"expected IP:PORT (port 0 picks a free one), got {text!r}")
        return host, number

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        value: int = self._typed(name, default, int, "an integer")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        return value

    def flag(self, name: str, default: Any = _MISSING) -> bool:
        value: bool = self._typed(name, default, bool, "true or false")
        return value

    def text_list(self, name: str, default: Any = _MISSING) -> list[str]:
        value = self._typed(name, default, list, "a list of strings")
        if not all(isinstance(item, str) for item in value):
            raise self.error(name, f"expected a list of strings, got {value!r}")
        return list(value)

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def duration(self, name: str, default: Any = _MISSING) -> int:
        return parse_duration(self.text(name, default), self.file, self.key(name))

    def section(self, name: str, default: Any = _MISSING) -> Section:
        value = self._typed(name, default, dict, "a table")
        return Section(value, self.file, self.key(name))

    def sections(self, name: str) -> list[Section]:
        """An array of tables (`[[name]]`), each read as a Section."""
        value = self._typed(name, [], list, "an array of tables")
        if not all(isinstance(item, dict) for item in value):
            raise self.error(name, "expected an array of tables ([[...]])")
        return [Section(item, self.file, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def localised(self, name: str, languages: tuple[str, ...]) -> dict[str, str]:
        """A text given once per language, as `{ en = "…", de = "…" }`."""
        table = self.section(name)
        texts = {lang: table.text(lang) for lang in languages}
        table.finish()
        return texts

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")
