"""A real server process for tests and benchmarks, in a temporary directory of its own.

What tests/redisserver.py (Redis) and tests/kamailio.py (Kamailio) share: the binary
found at its Debian path, or named by an environment variable, or on PATH; a temporary
directory (on /dev/shm when it has room); a free loopback port, tried again when
someone else took it before the server bound it; the server in its own process group,
so a stop kills the workers it started too; `stop()` then `start()` on the same port;
the directory removed by `close()`, at the latest when the interpreter exits (a session
ended by an error skips fixture teardown). Each server says how it is prepared,
started and asked whether it is ready.

Plain library code (no pytest): `bench/` imports it too. (tests/pgserver.py is not one
of these: pg_ctl starts and stops PostgreSQL, and it runs as another user under root.)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, ClassVar

from tests.pgserver import fast_temp_dir

_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it


def find_binary(env: str, debian: Path, name: str) -> Path | None:
    """The binary `env` names, else Debian's, else `name` on PATH (only when `env` is
    unset: a wrong setting is not silently replaced); None when there is none."""
    configured = os.environ.get(env)
    binary = Path(configured) if configured else debian
    if binary.is_file():
        return binary
    found = shutil.which(name)
    return Path(found) if found and not configured else None


class ServerProcess:
    """One server process; see the module docstring. A subclass names itself, its
    error, its log, what its log says when the port was taken, and implements
    `_free_port`, `_args` and `_ready` (and `_prepare`, `_stopped` when it needs them);
    its `start()` calls `_start()` and answers what its clients need (URL, port)."""

    name: ClassVar[str]  # in errors: "redis-server", "kamailio"
    error: ClassVar[type[RuntimeError]]  # raised when it does not start or answer
    dir_prefix: ClassVar[str]
    log_name: ClassVar[str]
    port_taken: ClassVar[str]  # in its log when another process had the port
    output_to_log: ClassVar[bool] = False  # its stdout and stderr go to the log file
    poll_interval: ClassVar[float] = 0.01
    log_lines: ClassVar[int] = 20  # how much of the log an error shows

    def __init__(self, binary: Path, *, wait: float, base_dir: Path | None) -> None:
        self.binary = binary
        self.wait = wait
        self._base_dir = base_dir or fast_temp_dir()
        self.root: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._atexit = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        if self.root is None:
            raise self.error("the server was never started")
        return self.root / self.log_name

    # --- what a server says ---------------------------------------------------------

    def _prepare(self) -> None:
        """Fill its new directory (self.root) before the first start."""

    def _free_port(self) -> int:
        raise NotImplementedError

    def _args(self) -> list[str]:
        """Its command line (self.root and self.port are set)."""
        raise NotImplementedError

    def _ready(self) -> bool:
        """It answers (False while it does not yet)."""
        raise NotImplementedError

    def _stopped(self) -> None:
        """After its process ended (waiting for its port to be free, say)."""

    # --- life cycle -------------------------------------------------------------------

    def _start(self) -> None:
        """Start the server: set up on the first call, on its first port again after
        `stop()`; nothing when it runs."""
        if self.running:
            return
        if self.root is not None:
            self._launch()
            return
        self.root = Path(tempfile.mkdtemp(prefix=self.dir_prefix, dir=self._base_dir))
        self._prepare()
        for attempt in range(_START_ATTEMPTS):
            self.port = self._free_port()
            try:
                self._launch()
                break
            except self.error:
                if attempt + 1 == _START_ATTEMPTS or self.port_taken not in self._log_tail():
                    raise
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def stop(self) -> None:
        """SIGTERM to the server; its process group is killed when that did not end it
        within a quarter of `wait` (workers left behind, say). The port is kept."""
        self._end(lambda process: process.terminate())

    def kill(self) -> None:
        """End the server at once (SIGKILL to its group), as a crash would; the port
        is kept."""
        self._end(None)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _end(self, ask: Callable[[subprocess.Popen[bytes]], None] | None) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if ask is not None and process.poll() is None:
            ask(process)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.wait / 4)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(self.wait / 4)
        self._stopped()

    def _launch(self) -> None:
        assert self.root is not None
        with contextlib.ExitStack() as stack:
            output: IO[bytes] | int = subprocess.DEVNULL
            if self.output_to_log:
                output = stack.enter_context(self.log_file.open("ab"))
            process = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=self.root,
                start_new_session=True,  # its own process group, killed as one
            )
        self._process = process
        deadline = time.monotonic() + self.wait / 2
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise self.error(f"{self.name} exited at start\n--- log ---\n{self._log_tail()}")
            if self._ready():
                return
            time.sleep(self.poll_interval)
        self.stop()
        raise self.error(
            f"{self.name} did not answer within {self.wait / 2:.0f} s\n"
            f"--- log ---\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except (FileNotFoundError, self.error):
            return "(no log)"
        return "\n".join(text.splitlines()[-self.log_lines :])
