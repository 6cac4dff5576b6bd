"""Policy logs: JSON lines per log category and UTC day, holding declared fields only.

Every category with `storage = "log"` gets `<data_dir>/log/<category>/<YYYY-MM-DD>.jsonl`,
one file per UTC day of the injected clock, so retention is enforced by deleting whole
files (`delete_expired_logs`, called by the retention sweeper).

Callers log an event name and structured fields:

    log = category_logger("push_log")
    log.info("push.sent", extra={"fields": {"provider": "apns", "outcome": "ok"}})

A line is the envelope (`time`, `level`, `logger`, `event`), then the fields. A field the
category does not declare (never-stored names cannot be declared), or a value of the
wrong type, is dropped: only its name is listed under `dropped`, so the bug is visible
without leaking the value. %-arguments and stray `extra` keys bypass the declaration,
so they are dropped and named the same way. An exception is written as its class name
only (`error_type`): exception messages and tracebacks carry personal data.

The logger tree that `setup_logging` wires:

    softrelay                       -> service_log (so every `softrelay.<subsystem>` logger)
    softrelay.category              -> a marker line in service_log, no value: a record for
                                       a category without a log (a database one, a typo)
    softrelay.category.<category>   -> that category's file, for each log category

None of them propagates to the root logger: a handler there (a library's basicConfig)
would print the records unfiltered.

Every other logger (aiohttp's "Error handling request from <IP>" with its traceback,
asyncio's "Task exception was never retrieved", warnings) is a library's, whose text is
formatted from whatever it had at hand: a client's address, a header, a repr. While a
LogSet is active such records reach the service log as a marker only, the logger name,
the level and the exception's class (`log.library_record`), never their text:

    root logger, logging.lastResort -> the marker in service_log (WARNING and up);
                                       the root's handlers and other libraries' own
                                       handlers are detached until close()
    warnings                        -> logging ("py.warnings"), so the marker
    threading.excepthook,           -> `softrelay.runtime`: the exception's class only
    sys.unraisablehook
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import TextIO

import orjson

from privacy.anonymise import anonymise_ip
from privacy.clock import Clock, iso
from privacy.policy import (
    LOG_ENVELOPE,
    Category,
    FieldSpec,
    FieldType,
    Policy,
    Protection,
    Storage,
)
from tomlsections.reader import ConfigError

ROOT_LOGGER = "softrelay"
CATEGORY_LOGGER = "softrelay.category"
SERVICE_LOG = "service_log"
ENVELOPE = tuple(sorted(LOG_ENVELOPE))
# Caps that keep one hostile value (a user agent, say) from filling the disk.
MAX_TEXT_CHARS = 1024
MAX_JSON_BYTES = 4096

_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")
# A dropped name is printed only if it looks like an identifier: a caller that passes a
# dict keyed by user data must not leak it through the names either.
_SHOWABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields"}
_DROP = object()


def log_dir(data_dir: Path, category: str) -> Path:
    return data_dir / "log" / category


def day_of(when: float) -> str:
    """The UTC day of an instant, as its file stem: 'YYYY-MM-DD'."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d")


class PolicyLogHandler(logging.Handler):
    """Writes the records of one log category to that category's daily file.

    Never raises out of `emit`: a failing log must not fail a call. A failure is
    counted in `failures` and reported once on stderr by exception class only.
    """

    def __init__(
        self, category: Category, data_dir: Path, clock: Clock, *, console: TextIO | None = None
    ) -> None:
        if category.storage is not Storage.LOG:
            raise ValueError(f"category {category.name!r} is not stored in a log")
        for name in ENVELOPE:
            if name in category.fields:
                raise ValueError(f"field {name!r} of {category.name!r} is a key of every log line")
        super().__init__()
        self.category = category
        self.failures = 0
        self._data_dir = data_dir
        self._clock = clock
        self._console = console
        self._fd: int | None = None
        self._day = ""
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = self._clock.now()
            line = self.format_line(record, now)
            self._write(line, day_of(now))
            if self._console is not None:
                self._console.write(line.decode())
                self._console.flush()
            self._failing = False
        except Exception as exc:
            self._report_failure(exc)

    def format_line(self, record: logging.LogRecord, now: float) -> bytes:
        dropped: list[str] = []
        event = record.msg if isinstance(record.msg, str) else "<not text>"
        if not isinstance(record.msg, str):
            dropped.append("msg")
        if record.args:
            dropped.append("args")
        line: dict[str, object] = {
            "time": iso(now),
            "level": record.levelname,
            "logger": record.name,
            "event": event[:MAX_TEXT_CHARS],
        }
        fields = record.__dict__.get("fields")
        if isinstance(fields, Mapping):
            for name, value in fields.items():
                kept = self._field(name, value)
                if kept is _DROP:
                    dropped.append(_showable(name))
                else:
                    line[name] = kept
        elif fields is not None:
            dropped.append("fields")
        dropped.extend(_showable(name) for name in record.__dict__ if name not in _RECORD_ATTRS)
        if record.exc_info is not None and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
        if dropped:
            line["dropped"] = list(dict.fromkeys(dropped))
        return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)

    def _field(self, name: object, value: object) -> object:
        spec = self.category.fields.get(name) if isinstance(name, str) else None
        if spec is None:
            return _DROP
        return _checked(spec, value)

    def _write(self, line: bytes, day: str) -> None:
        fd = self._fd
        if fd is None or day != self._day or os.fstat(fd).st_nlink == 0:
            # st_nlink 0: the file was deleted under us (an erasure, a sub-day retention);
            # writing on would put lines where nobody can read them.
            fd = self._reopen(day)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]

    def _reopen(self, day: str) -> int:
        self._close_file()
        directory = log_dir(self._data_dir, self.category.name)
        _make_private_dirs(directory)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd = os.open(directory / f"{day}.jsonl", flags, 0o600)
        self._day = day
        return self._fd

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _report_failure(self, exc: Exception) -> None:
        self.failures += 1
        if self._failing:
            return
        self._failing = True
        # Not handleError(): it prints the record's message and arguments. If stderr is
        # gone too, there is nowhere left to tell.
        with contextlib.suppress(Exception):
            sys.stderr.write(
                f"softrelay: cannot write the {self.category.name} log ({type(exc).__name__})\n"
            )

    def close(self) -> None:
        self.acquire()
        try:
            with contextlib.suppress(OSError):
                self._close_file()
        finally:
            self.release()
        super().close()


def _checked(spec: FieldSpec, value: object) -> object:
    """The value as it may be written for this field, or _DROP."""
    if spec.type is FieldType.TEXT:
        if not isinstance(value, str) or not _is_utf8(value):
            return _DROP
        if spec.protection is Protection.ANONYMISED:
            try:
                return anonymise_ip(value)
            except ValueError:
                return _DROP
        return value[:MAX_TEXT_CHARS]
    if spec.type is FieldType.INT:
        return value if isinstance(value, int) and not isinstance(value, bool) else _DROP
    if spec.type is FieldType.REAL:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return value if ok else _DROP
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _DROP
    # A Fragment is written as is, so the value is encoded once, not twice.
    return orjson.Fragment(encoded) if len(encoded) <= MAX_JSON_BYTES else _DROP


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: orjson would refuse the whole line
        return False
    return True


def _showable(name: object) -> str:
    return name if isinstance(name, str) and _SHOWABLE_NAME.match(name) else "<invalid name>"


def _make_private_dirs(directory: Path) -> None:
    # mkdir(parents=True) would create the parents with the umask's mode, not 0700.
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


class _StrayCategoryHandler(logging.Handler):
    """Records for `softrelay.category.<name>` where <name> has no log: writes no value of
    them, only a warning in the service log that names the category."""

    def __init__(self, service: PolicyLogHandler) -> None:
        super().__init__()
        self._service = service

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name.removeprefix(f"{CATEGORY_LOGGER}.")
        marker = logging.makeLogRecord(
            {
                "name": record.name,
                "levelno": logging.WARNING,
                "levelname": logging.getLevelName(logging.WARNING),
                "msg": "log.record_for_category_without_log",
                "fields": {"category": name},
            }
        )
        self._service.handle(marker)


class _LibraryHandler(logging.Handler):
    """Records of loggers outside the softrelay tree: a marker line in the service log
    that names the logger, the level and the exception's class, and nothing of the text
    or the arguments (see the module doc)."""

    def __init__(self, service: PolicyLogHandler) -> None:
        super().__init__(logging.WARNING)
        self._service = service

    def emit(self, record: logging.LogRecord) -> None:
        exc_info = record.exc_info if record.exc_info and record.exc_info[0] else None
        marker = logging.makeLogRecord(
            {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": "log.library_record",
                "exc_info": exc_info,
            }
        )
        self._service.handle(marker)


_runtime = logging.getLogger(f"{ROOT_LOGGER}.runtime")


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    # The default hook prints the traceback and message, which may quote data.
    if args.exc_value is not None and args.exc_type is not SystemExit:
        _runtime.error("thread.failed", exc_info=(args.exc_type, args.exc_value, None))


def _unraisable(args: sys.UnraisableHookArgs) -> None:
    # "Exception ignored in: <repr>" would print an object's repr.
    if args.exc_value is not None:
        _runtime.warning("exception.unraisable", exc_info=(args.exc_type, args.exc_value, None))


class LogSet:
    """The handlers `setup_logging` attached. `close()` detaches and closes them and puts
    the loggers back as they were; it may be called more than once."""

    def __init__(self, handlers: dict[str, PolicyLogHandler]) -> None:
        self.handlers = handlers
        self._attached: list[tuple[logging.Logger, logging.Handler]] = []
        self._saved: list[tuple[logging.Logger, int, bool]] = []
        self._detached: list[tuple[logging.Logger, logging.Handler]] = []
        self._undo: list[tuple[object, str, object]] = []  # (module, attribute, value)
        self.closed = False

    def _route_libraries(self, service: PolicyLogHandler) -> None:
        """Every record outside the softrelay tree becomes a marker (see module doc)."""
        library = _LibraryHandler(service)
        root = logging.getLogger()
        loggers = [root] + [
            logger
            for name, logger in logging.Logger.manager.loggerDict.items()
            if isinstance(logger, logging.Logger)
            and name != ROOT_LOGGER
            and not name.startswith(f"{ROOT_LOGGER}.")
        ]
        for logger in loggers:
            for handler in logger.handlers[:]:
                if not isinstance(handler, logging.NullHandler):
                    logger.removeHandler(handler)
                    self._detached.append((logger, handler))
        root.addHandler(library)
        self._attached.append((root, library))
        # Where a record finds no handler at all (a library logger that does not
        # propagate), Python prints it to stderr through the last resort: not any more.
        self._replace(logging, "lastResort", library)
        self._replace(threading, "excepthook", _thread_failed)
        self._replace(sys, "unraisablehook", _unraisable)
        logging.captureWarnings(True)

    def _replace(self, module: object, attribute: str, value: object) -> None:
        self._undo.append((module, attribute, getattr(module, attribute)))
        setattr(module, attribute, value)

    def _attach(
        self, logger: logging.Logger, handler: logging.Handler, level: int | None = None
    ) -> None:
        self._saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        self._attached.append((logger, handler))
        logger.propagate = False
        if level is not None:
            logger.setLevel(level)

    def close(self) -> None:
        global _active
        if self.closed:
            return
        self.closed = True
        if self._undo:
            logging.captureWarnings(False)
        for module, attribute, value in reversed(self._undo):
            setattr(module, attribute, value)
        for logger, handler in self._attached:
            logger.removeHandler(handler)
            handler.close()
        for logger, handler in self._detached:
            logger.addHandler(handler)
        for logger, level, propagate in reversed(self._saved):
            logger.setLevel(level)
            logger.propagate = propagate
        if _active is self:
            _active = None

    def __enter__(self) -> LogSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# The stdlib logger tree is global: a second setup replaces the first instead of adding
# a second handler that would write every line twice.
_active: LogSet | None = None


def setup_logging(
    policy: Policy,
    data_dir: Path,
    clock: Clock,
    *,
    level: int = logging.INFO,
    console: bool = False,
) -> LogSet:
    """Wire the softrelay logger tree to the policy's log categories (see module doc).

    `console` mirrors the service log's lines on stderr for `softrelay serve` in the
    foreground. Only the service log's: it declares no personal data, while a category
    log may keep an address or a user agent (troubleshooting_log) for its own retention,
    which a copy on stderr (a terminal, journald) would escape.
    """
    global _active
    categories = {c.name: c for c in policy.stored(Storage.LOG)}
    if SERVICE_LOG not in categories:
        raise ConfigError(
            policy.source, f"categories.{SERVICE_LOG}", 'must be declared with storage = "log"'
        )
    stream = sys.stderr if console else None
    handlers: dict[str, PolicyLogHandler] = {}
    for name, category in categories.items():
        try:
            mirror = stream if name == SERVICE_LOG else None
            handlers[name] = PolicyLogHandler(category, data_dir, clock, console=mirror)
        except ValueError as exc:
            raise ConfigError(policy.source, f"categories.{name}.fields", str(exc)) from exc
    if _active is not None:
        _active.close()
    logset = LogSet(handlers)
    service = handlers[SERVICE_LOG]
    logset._attach(logging.getLogger(ROOT_LOGGER), service, level)
    logset._attach(logging.getLogger(CATEGORY_LOGGER), _StrayCategoryHandler(service))
    for name, handler in handlers.items():
        logset._attach(category_logger(name), handler)
    logset._route_libraries(service)
    _active = logset
    return logset


def subsystem_logger(name: str) -> logging.Logger:
    """The logger of one subsystem ("proxy", "push", …); its lines go to service_log."""
    if name == "category" or name.startswith("category."):
        raise ValueError("'category' is the prefix of the category loggers, not a subsystem")
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


def category_logger(category: str) -> logging.Logger:
    """The logger whose lines go to the file of one log category."""
    return logging.getLogger(f"{CATEGORY_LOGGER}.{category}")


def expired_log_files(category: Category, data_dir: Path, now: float) -> list[Path]:
    """Files of days D with start-of-D (00:00 UTC) + retention <= now.

    Judged by the day's start, so no line is ever older than the retention: retention
    is a maximum. Files whose name is not a date are left alone.
    """
    if category.storage is not Storage.LOG:
        raise ValueError(f"category {category.name!r} is not stored in a log")
    directory = log_dir(data_dir, category.name)
    if not directory.is_dir():
        return []
    expired = []
    for path in directory.iterdir():
        match = _DAY_FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        try:
            day = date.fromisoformat(match.group(1))
        except ValueError:
            continue
        start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        if start + category.retention.seconds <= now:
            expired.append(path)
    return sorted(expired)


def delete_expired_logs(policy: Policy, data_dir: Path, now: float) -> dict[str, int]:
    """Delete the expired files of every log category; the count deleted per category."""
    deleted: dict[str, int] = {}
    for category in policy.stored(Storage.LOG):
        count = 0
        for path in expired_log_files(category, data_dir, now):
            try:
                path.unlink()
            except FileNotFoundError:  # another sweeper was first
                continue
            count += 1
        deleted[category.name] = count
    return deleted
