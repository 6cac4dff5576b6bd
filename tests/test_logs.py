"""Policy logs: only declared fields reach the files, files rotate by UTC day and expire
by whole days so that no line outlives its category's retention."""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from privacy.clock import ManualClock, parse_instant
from privacy.logs import (
    LogSet,
    PolicyLogHandler,
    category_logger,
    delete_expired_logs,
    expired_log_files,
    setup_logging,
    subsystem_logger,
)
from privacy.policy import Policy, Protection, load_policy
from tomlsections.reader import ConfigError

DAY = "2024-05-01"
START_OF_DAY = parse_instant(f"{DAY}T00:00:00Z")
NOON = START_OF_DAY + 12 * 3600
WEEK = 7 * 86400


@pytest.fixture
def policy() -> Policy:
    return load_policy("auerproxy")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOON)


@pytest.fixture
def logs(policy: Policy, tmp_path: Path, clock: ManualClock) -> Iterator[LogSet]:
    logset = setup_logging(policy, tmp_path, clock)
    yield logset
    logset.close()


def log_file(data_dir: Path, category: str, day: str = DAY) -> Path:
    return data_dir / "log" / category / f"{day}.jsonl"


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_nowhere(data_dir: Path, *markers: str) -> None:
    """Canary scan: no byte of any file under the data directory holds a marker."""
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert files, "nothing was written, so the scan would prove nothing"
    for path in files:
        raw = path.read_bytes()
        for marker in markers:
            assert marker.encode() not in raw, f"{marker!r} found in {path}"


def test_a_line_holds_the_envelope_and_the_declared_fields(logs: LogSet, tmp_path: Path) -> None:
    fields = {"provider": "apns", "outcome": "delivered", "latency_ms": 12.5, "token_fp": "fp-1"}
    category_logger("push_log").info("push.sent", extra={"fields": fields})

    assert read_lines(log_file(tmp_path, "push_log")) == [
        {
            "time": "2024-05-01T12:00:00Z",
            "level": "INFO",
            "logger": "softrelay.category.push_log",
            "event": "push.sent",
            **fields,
        }
    ]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_subsystem_loggers_write_to_the_service_log_and_not_to_the_root_logger(
    logs: LogSet, tmp_path: Path
) -> None:
    # A root handler (a library's basicConfig) would print records unfiltered.
    root_handler = _Collect()
    logging.getLogger().addHandler(root_handler)
    try:
        subsystem_logger("proxy").info("proxy.up", extra={"fields": {"listen": "udp:5060"}})
        subsystem_logger("proxy").debug("proxy.below_the_level")
        category_logger("push_log").info("push.sent")
        category_logger("provisioning_log").info("provisioning.fetched")
    finally:
        logging.getLogger().removeHandler(root_handler)

    assert root_handler.records == []
    up, stray = read_lines(log_file(tmp_path, "service_log"))
    assert (up["logger"], up["event"], up["listen"]) == ("softrelay.proxy", "proxy.up", "udp:5060")
    assert stray["category"] == "provisioning_log"
    assert len(read_lines(log_file(tmp_path, "push_log"))) == 1


def test_an_undeclared_field_is_dropped_and_only_its_name_is_written(
    logs: LogSet, tmp_path: Path
) -> None:
    fields = {
        "provider": "fcm",
        "push_token": "TOKEN-CANARY-1",
        "sip_username": "alice-CANARY-2",
        "password": "hunter2-CANARY-3",
    }
    category_logger("push_log").info("push.sent", extra={"fields": fields})

    assert_nowhere(tmp_path, "TOKEN-CANARY-1", "alice-CANARY-2", "hunter2-CANARY-3")
    [line] = read_lines(log_file(tmp_path, "push_log"))
    assert line["provider"] == "fcm"
    assert line["dropped"] == ["push_token", "sip_username", "password"]


def test_a_value_of_the_wrong_type_is_dropped(logs: LogSet, tmp_path: Path) -> None:
    fields = {"latency_ms": "12ms-CANARY", "outcome": {"detail": "obj-CANARY"}, "provider": True}
    category_logger("push_log").info("push.sent", extra={"fields": fields})

    assert_nowhere(tmp_path, "12ms-CANARY", "obj-CANARY")
    [line] = read_lines(log_file(tmp_path, "push_log"))
    assert line["dropped"] == ["latency_ms", "outcome", "provider"]
    assert "provider" not in line


def test_format_arguments_and_stray_extra_keys_bypass_nothing(logs: LogSet, tmp_path: Path) -> None:
    """`log.info("... %s", user)` and `extra={"ip": ...}` would skip the declaration."""
    subsystem_logger("proxy").info(
        "registered %s", "alice-CANARY", extra={"ip": "198.51.100.23", "fields": {"count": 1}}
    )

    assert_nowhere(tmp_path, "alice-CANARY", "198.51.100.23")
    [line] = read_lines(log_file(tmp_path, "service_log"))
    assert (line["event"], line["count"]) == ("registered %s", 1)
    assert line["dropped"] == ["args", "ip"]


def test_a_field_never_stored_in_the_service_log_is_dropped_there(
    logs: LogSet, tmp_path: Path
) -> None:
    subsystem_logger("privacy").info("sweep.done", extra={"fields": {"ip": "198.51.100.23"}})

    assert_nowhere(tmp_path, "198.51.100.23")
    [line] = read_lines(log_file(tmp_path, "service_log"))
    assert line["dropped"] == ["ip"]


def test_troubleshooting_log_keeps_the_declared_ip_as_given(logs: LogSet, tmp_path: Path) -> None:
    fields = {"ip": "198.51.100.23", "user_agent": "Softphone/1.0", "route": "oauth", "status": 200}
    category_logger("troubleshooting_log").info("oauth.token", extra={"fields": fields})

    [line] = read_lines(log_file(tmp_path, "troubleshooting_log"))
    assert {name: line[name] for name in fields} == fields
    assert "dropped" not in line


def test_only_log_categories_get_a_file_and_a_stray_record_leaves_only_its_category_name(
    logs: LogSet, tmp_path: Path
) -> None:
    assert set(logs.handlers) == {"service_log", "push_log", "troubleshooting_log"}
    fields = {"ip_prefix": "203.0.113.77", "pbx_serial": "SERIAL-CANARY"}
    category_logger("provisioning_log").info("provisioning.fetched", extra={"fields": fields})

    assert not (tmp_path / "log" / "provisioning_log").exists()
    assert_nowhere(tmp_path, "SERIAL-CANARY", "203.0.113")
    [line] = read_lines(log_file(tmp_path, "service_log"))
    assert (line["level"], line["event"], line["category"]) == (
        "WARNING",
        "log.record_for_category_without_log",
        "provisioning_log",
    )


def test_an_anonymised_log_field_is_cut_at_write_and_an_unparsable_one_dropped(
    policy: Policy, tmp_path: Path, clock: ManualClock
) -> None:
    # No shipped log category has an anonymised field; the rule must still hold when one does.
    base = policy.category("troubleshooting_log")
    ip = replace(base.fields["ip"], protection=Protection.ANONYMISED)
    category = replace(base, fields={**base.fields, "ip": ip})
    handler = PolicyLogHandler(category, tmp_path, clock)
    try:
        for value in ("198.51.100.23:5060", "host-CANARY"):
            handler.handle(logging.makeLogRecord({"msg": "oauth.token", "fields": {"ip": value}}))
    finally:
        handler.close()

    assert_nowhere(tmp_path, "198.51.100.23", "host-CANARY")
    first, second = read_lines(log_file(tmp_path, "troubleshooting_log"))
    assert first["ip"] == "198.51.100.0"
    assert ("ip" not in second, second["dropped"]) == (True, ["ip"])


def test_a_long_text_value_is_cut_to_a_bounded_length(logs: LogSet, tmp_path: Path) -> None:
    fields = {"user_agent": "x" * 100_000}
    category_logger("troubleshooting_log").info("oauth.token", extra={"fields": fields})

    [line] = read_lines(log_file(tmp_path, "troubleshooting_log"))
    assert len(line["user_agent"]) == 1024


def test_an_exception_is_written_as_its_class_name_only(logs: LogSet, tmp_path: Path) -> None:
    def fail() -> None:
        raise ValueError("bad digest from alice@example.com CANARY")

    try:
        fail()
    except ValueError:
        subsystem_logger("proxy").exception(
            "register.failed", extra={"fields": {"pbx_serial": "0815"}}, stack_info=True
        )

    raw = log_file(tmp_path, "service_log").read_bytes()
    assert b"CANARY" not in raw
    assert b"Traceback" not in raw
    assert b"Stack" not in raw
    [line] = read_lines(log_file(tmp_path, "service_log"))
    assert (line["level"], line["error_type"]) == ("ERROR", "ValueError")
    assert line["pbx_serial"] == "0815"


def test_crossing_midnight_writes_to_the_new_days_file(
    logs: LogSet, tmp_path: Path, clock: ManualClock
) -> None:
    clock.set(parse_instant(f"{DAY}T23:59:59Z"))
    subsystem_logger("proxy").info("before.midnight")
    clock.advance(2)
    subsystem_logger("proxy").info("after.midnight")

    [before] = read_lines(log_file(tmp_path, "service_log", DAY))
    [after] = read_lines(log_file(tmp_path, "service_log", "2024-05-02"))
    assert (before["event"], after["event"]) == ("before.midnight", "after.midnight")
    assert after["time"] == "2024-05-02T00:00:01Z"


def test_a_file_deleted_while_open_is_created_again(logs: LogSet, tmp_path: Path) -> None:
    subsystem_logger("proxy").info("first")
    log_file(tmp_path, "service_log").unlink()
    subsystem_logger("proxy").info("second")

    assert [line["event"] for line in read_lines(log_file(tmp_path, "service_log"))] == ["second"]


def test_directories_are_0700_and_files_0600(
    policy: Policy, tmp_path: Path, clock: ManualClock
) -> None:
    data_dir = tmp_path / "data"
    with setup_logging(policy, data_dir, clock):
        category_logger("push_log").info("push.sent")

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(log_file(data_dir, "push_log")) == 0o600
    for directory in (data_dir, data_dir / "log", data_dir / "log" / "push_log"):
        assert mode(directory) == 0o700, directory


@pytest.mark.parametrize(
    ("offset", "kept"),
    [(-1, True), (0, False), (1, False)],
    ids=["start+7d-1s kept", "start+7d gone", "start+7d+1s gone"],
)
def test_a_days_file_is_deleted_once_the_start_of_the_day_plus_retention_has_passed(
    logs: LogSet, policy: Policy, tmp_path: Path, offset: int, kept: bool
) -> None:
    push_log = policy.category("push_log")
    assert push_log.retention.seconds == WEEK
    category_logger("push_log").info("push.sent")
    path = log_file(tmp_path, "push_log")
    now = START_OF_DAY + WEEK + offset

    assert expired_log_files(push_log, tmp_path, now) == ([] if kept else [path])
    deleted = delete_expired_logs(policy, tmp_path, now)

    assert deleted == {"troubleshooting_log": 0, "push_log": 0 if kept else 1, "service_log": 0}
    assert path.exists() is kept


def test_files_not_named_by_a_date_are_left_alone(policy: Policy, tmp_path: Path) -> None:
    directory = tmp_path / "log" / "push_log"
    directory.mkdir(parents=True)
    names = ["notes.txt", "2024-13-45.jsonl", "2024-05-01.jsonl.gz", "x2024-05-01.jsonl"]
    for name in names:
        (directory / name).write_bytes(b"{}\n")
    (directory / "2024-05-01.jsonl").write_bytes(b"{}\n")

    far_future = START_OF_DAY + 100 * WEEK
    assert delete_expired_logs(policy, tmp_path, far_future)["push_log"] == 1
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


def test_expiry_of_a_category_that_is_not_a_log_is_refused(policy: Policy, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not stored in a log"):
        expired_log_files(policy.category("registration"), tmp_path, NOON)


def test_a_log_that_cannot_be_written_never_raises_and_names_only_the_error_class(
    policy: Policy, tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")
    with setup_logging(policy, blocked, clock) as logs:
        subsystem_logger("proxy").warning("proxy.failed", extra={"fields": {"error": "CANARY"}})
        subsystem_logger("proxy").warning("proxy.failed")
        assert logs.handlers["service_log"].failures == 2

    err = capsys.readouterr().err
    assert "CANARY" not in err
    assert re.fullmatch(r"softrelay: cannot write the service_log log \(\w+Error\)\n", err)


def test_console_mirrors_the_file_lines_on_stderr(
    policy: Policy, tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    with setup_logging(policy, tmp_path, clock, console=True):
        subsystem_logger("proxy").info("proxy.listening", extra={"fields": {"listen": "tcp:5060"}})

    assert capsys.readouterr().err.encode() == log_file(tmp_path, "service_log").read_bytes()


def test_the_console_mirrors_no_category_log_so_no_address_reaches_stderr(
    policy: Policy, tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """The troubleshooting log keeps a caller's IP and user agent under its own
    retention; its lines stay in its file, never on stderr."""
    fields = {"ip": "203.0.113.77", "user_agent": "CANARY-agent", "route": "/x", "status": 400}
    with setup_logging(policy, tmp_path, clock, console=True):
        category_logger("troubleshooting_log").info("oauth.token", extra={"fields": fields})

    assert b"203.0.113.77" in log_file(tmp_path, "troubleshooting_log").read_bytes()
    err = capsys.readouterr().err
    assert "203.0.113.77" not in err
    assert "CANARY" not in err


def test_setup_again_replaces_the_first_set_and_close_restores_the_loggers(
    policy: Policy, tmp_path: Path, clock: ManualClock
) -> None:
    names = ["softrelay", "softrelay.category", "softrelay.category.push_log"]
    before = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}

    first = setup_logging(policy, tmp_path, clock)
    second = setup_logging(policy, tmp_path, clock)
    assert first.closed
    subsystem_logger("proxy").info("once")
    assert len(read_lines(log_file(tmp_path, "service_log"))) == 1

    second.close()
    second.close()
    first.close()
    after = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    assert after == before


def test_a_log_field_named_like_an_envelope_key_stops_the_start(
    policy: Policy, tmp_path: Path, clock: ManualClock
) -> None:
    push_log = policy.category("push_log")
    bad = replace(push_log, fields={**push_log.fields, "event": push_log.fields["provider"]})
    broken = replace(policy, categories={**policy.categories, "push_log": bad})

    with pytest.raises(ConfigError, match=r"categories\.push_log\.fields"):
        setup_logging(broken, tmp_path, clock)
    assert not any(isinstance(h, PolicyLogHandler) for h in logging.getLogger("softrelay").handlers)


def test_the_category_logger_prefix_is_not_a_subsystem() -> None:
    with pytest.raises(ValueError, match="prefix"):
        subsystem_logger("category.push_log")
    assert subsystem_logger("push").name == "softrelay.push"
    assert category_logger("push_log").name == "softrelay.category.push_log"


def test_umask_does_not_widen_the_modes(policy: Policy, tmp_path: Path, clock: ManualClock) -> None:
    old = os.umask(0)
    try:
        with setup_logging(policy, tmp_path, clock):
            category_logger("push_log").info("push.sent")
    finally:
        os.umask(old)
    assert stat.S_IMODE(log_file(tmp_path, "push_log").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "log").stat().st_mode) == 0o700


# --- records of other loggers: libraries, the last resort, threads, warnings ----------

LEAK = "CANARY-127.9.8.7-Bearer-s3cr3t"


def _library_lines(data_dir: Path) -> list[dict[str, Any]]:
    path = log_file(data_dir, "service_log")
    lines = read_lines(path) if path.exists() else []
    return [line for line in lines if line["event"] == "log.library_record"]


def test_a_library_record_becomes_a_marker_without_its_text_or_arguments(
    policy: Policy, tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """aiohttp's "Error handling request from <IP>" with a traceback whose message quotes
    a header: only the logger, level and exception class reach the log and the console."""

    def parse() -> None:
        raise ValueError(f"Invalid header: Authorization: {LEAK}")

    with setup_logging(policy, tmp_path, clock, console=True):
        try:
            parse()
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request from %s", LEAK)
        logging.getLogger("asyncio").error(f"Task exception was never retrieved {LEAK}")
        logging.getLogger("aiohttp.access").info("below the threshold %s", LEAK)

    captured = capsys.readouterr()
    assert LEAK not in captured.err + captured.out
    assert LEAK.encode() not in log_file(tmp_path, "service_log").read_bytes()
    server, loop = _library_lines(tmp_path)
    assert server == {
        "time": "2024-05-01T12:00:00Z",
        "level": "ERROR",
        "logger": "aiohttp.server",
        "event": "log.library_record",
        "error_type": "ValueError",
    }
    assert (loop["logger"], loop["level"]) == ("asyncio", "ERROR")


def test_the_last_resort_and_handlers_libraries_brought_are_detached_until_close(
    policy: Policy, tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A root handler (a library's basicConfig), a library logger's own handler, and a
    logger with no handler at all (Python's last resort prints it on stderr)."""
    root_handler, own_handler = _Collect(), _Collect()
    logging.getLogger().addHandler(root_handler)
    chatty = logging.getLogger("some.library")
    chatty.addHandler(own_handler)
    lonely = logging.getLogger("lonely.library")
    lonely.propagate = False
    last_resort = logging.lastResort
    try:
        with setup_logging(policy, tmp_path, clock):
            chatty.warning("chatty %s", LEAK)
            lonely.warning("lonely %s", LEAK)
        assert root_handler.records == own_handler.records == []
        assert [line["logger"] for line in _library_lines(tmp_path)] == [
            "some.library",
            "lonely.library",
        ]
        assert LEAK not in capsys.readouterr().err
        # Put back as they were.
        assert root_handler in logging.getLogger().handlers
        assert own_handler in chatty.handlers
        assert logging.lastResort is last_resort
    finally:
        logging.getLogger().removeHandler(root_handler)
        chatty.removeHandler(own_handler)
        lonely.propagate = True


def test_a_failing_thread_and_a_warning_leave_only_their_class(
    policy: Policy, tmp_path: Path, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail() -> None:
        raise KeyError(LEAK)

    hooks = (threading.excepthook, sys.unraisablehook)
    with setup_logging(policy, tmp_path, clock):
        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"unclosed transport {LEAK}", ResourceWarning, stacklevel=1)

    assert LEAK not in capsys.readouterr().err
    lines = read_lines(log_file(tmp_path, "service_log"))
    assert LEAK.encode() not in log_file(tmp_path, "service_log").read_bytes()
    failed = [line for line in lines if line["event"] == "thread.failed"]
    assert [(line["logger"], line["error_type"]) for line in failed] == [
        ("softrelay.runtime", "KeyError")
    ]
    assert [line["logger"] for line in _library_lines(tmp_path)] == ["py.warnings"]
    assert (threading.excepthook, sys.unraisablehook) == hooks
