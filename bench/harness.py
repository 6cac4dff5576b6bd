"""What the benches share: the processes they start, ports, /proc readings, the
open-file limit, the result file and the few statistics they report.

- `Processes` starts every server and peer a bench runs, each in its own session, and
  ends the ones still running on the way out, on error too.
- `start_softrelay` runs `softrelay serve` on ports 0 and reads its ports from its
  start-up report; `start_kamailio` runs Kamailio from a peer config with this run's ports.
- `raise_nofile` is the one place a bench raises its open-file limit (its children,
  the servers, inherit it).
- `write_result` writes a bench's JSON; `nearest_rank` and `spread` are the percentile
  and the median/min/max the reports give.

Import it as `bench.harness`; a bench run as a script puts the repository first on
`sys.path` to make that possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # s for a server to come up
STOP_TIMEOUT = 15.0  # s for a server to end after SIGTERM, before SIGKILL
SERVE = (sys.executable, "-m", "softrelay.cli")  # `softrelay` of this tree
NO_CONFIG = {"SOFTRELAY_CONFIG": ""}  # only the --config a bench gives counts


# --- processes ----------------------------------------------------------------------------


class Processes:
    """Every process a bench starts, each in its own session: `close` ends the ones
    still running (SIGTERM, then SIGKILL to that process group), on error too."""

    def __init__(self) -> None:
        self._running: dict[int, asyncio.subprocess.Process] = {}

    async def start(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
        env: dict[str, str] | None = None,
    ) -> asyncio.subprocess.Process:
        with log.open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self._running[proc.pid] = proc
        return proc

    async def wait(self, proc: asyncio.subprocess.Process, timeout: float) -> int:  # noqa: ASYNC109
        """The exit status; the process group is killed if it overruns `timeout`."""
        try:
            status = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            self._kill(proc)
            status = await proc.wait()
        self._running.pop(proc.pid, None)
        return status

    async def stop(self, proc: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        return await self.wait(proc, timeout)

    def _kill(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: it and its children

    async def close(self) -> None:
        for proc in list(self._running.values()):
            await self.stop(proc, 5.0)

    def kill_all(self) -> None:
        """Last resort when the event loop could not run `close`."""
        for proc in self._running.values():
            self._kill(proc)


def command_version(argv: Sequence[str], pattern: str) -> str:
    """The version a command prints, by the first group of `pattern`; "?" if none."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"


def raise_nofile(wanted: int | None = None) -> tuple[int, str]:
    """Raise this process's open-file limit to `wanted` (None: to the hard limit); its
    children inherit it. The new soft limit, and why it is lower than `wanted` if it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if wanted is None else wanted
    if soft >= wanted:
        return soft, ""
    why = ""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        # Raising the hard limit takes CAP_SYS_RESOURCE (root in a container may lack it).
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        why = f"the hard RLIMIT_NOFILE is {hard:,} and this process may not raise it"
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0], why


# --- ports ----------------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (Kamailio listens on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


async def wait_udp_bound(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    """Until someone holds UDP `port` (the server started by `proc` is up)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"{what} ended at start with status {proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                await asyncio.sleep(0.3)  # bound; let its workers start
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not bind UDP port {port} in {START_TIMEOUT:g} s")


# --- /proc ----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now (Kamailio forks its workers at start, crash ingest
    its scrubbing workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes (their threads included) so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def udp_receive_drops() -> int:
    """Datagrams the kernel dropped for full receive buffers, machine-wide, so far."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    udp = [ln for ln in lines if ln and ln[0] == "Udp:"]
    header, values = udp[0], udp[1]
    return int(values[header.index("RcvbufErrors")])


def status_kib(pid: int, key: str) -> int:
    """A kB line of /proc/<pid>/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise LookupError(key)


# --- softrelay ------------------------------------------------------------------------------


@dataclass(slots=True)
class Softrelay:
    """A running `softrelay serve`: its ports as it reported them, its log, its data."""

    proc: asyncio.subprocess.Process
    ports: dict[str, int]  # udp, tcp, http
    log: Path
    data_dir: Path
    drain: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.ports['http']}"

    async def metrics(self) -> str:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"{self.http_url}/metrics"
            async with session.get(url) as response:
                return await response.text()

    async def stop(self, procs: Processes, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109
        status = await procs.stop(self.proc, timeout)
        if self.drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain, 5)
        return status


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one Prometheus metric, by their label set."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            found[labels[len(name) :] or "{}"] = float(value)
    return found


async def start_softrelay(
    procs: Processes,
    work: Path,
    config: Path,
    *,
    command: Sequence[str] = SERVE,
    env: Mapping[str, str] | None = None,
) -> Softrelay:
    """`command serve --config CONFIG` with its data in `work`/data, its log in
    `work`/serve.log, on ports 0, once its start-up report has named every port.
    `command` runs the CLI (a profiling wrapper may stand in for it); `env` adds to
    its environment (a secret the config names as `env:NAME`)."""
    log = write_file(work / "serve.log", "")
    data_dir = work / "data"
    argv = [*command, "serve", "--config", str(config)]
    argv += ["--data-dir", str(data_dir), "--http-port", "0", "--sip-port", "0"]
    proc = await procs.start(
        argv, log, cwd=ROOT, stdout_pipe=True, env={**os.environ, **(env or {}), **NO_CONFIG}
    )
    assert proc.stdout is not None
    server = Softrelay(proc, {}, log, data_dir)
    out = log.open("a", encoding="utf-8")

    async def drain(stream: asyncio.StreamReader, sink: TextIO) -> None:
        try:
            while line := await stream.readline():
                sink.write(line.decode(errors="replace"))
        finally:
            sink.close()

    try:
        async with asyncio.timeout(START_TIMEOUT):
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                out.write(line)
                if match := re.match(r"softrelay: sip (udp|tcp) 127\.0\.0\.1:(\d+)$", line.strip()):
                    server.ports[match.group(1)] = int(match.group(2))
                elif match := re.match(r"softrelay: http://127\.0\.0\.1:(\d+) ", line):
                    server.ports["http"] = int(match.group(1))
                elif line.startswith("softrelay: profile"):  # the last line of its report
                    break
            else:
                server.ports.clear()  # ended before its start-up report
    except BaseException:
        out.close()
        await procs.stop(proc)
        raise
    server.drain = asyncio.create_task(drain(proc.stdout, out))  # its pipe never fills
    if set(server.ports) != {"udp", "tcp", "http"}:
        await server.stop(procs)
        raise RuntimeError(f"softrelay serve did not start; see {log}")
    return server


# --- Kamailio -------------------------------------------------------------------------------


def kamailio_config(shared: Path, port: int, uas_port: int) -> str:
    """The shared peer configuration with this run's ports: listen and $du."""
    text = shared.read_text(encoding="utf-8")
    text, listens = re.subn(
        r"^listen=(udp|tcp):127\.0\.0\.1:\d+", rf"listen=\1:{HOST}:{port}", text, flags=re.M
    )
    text, targets = re.subn(
        r'\$du = "sip:127\.0\.0\.1:\d+"', f'$du = "sip:{HOST}:{uas_port}"', text
    )
    if listens != 2 or targets != 1:
        raise RuntimeError(f"{shared}: expected two listen= lines and one $du to adapt")
    return text


async def start_kamailio(
    procs: Processes, shared: Path, work: Path, port: int, uas_port: int
) -> asyncio.subprocess.Process:
    """Kamailio from the peer config `shared`, on `port`, relaying to `uas_port`."""
    config = write_file(work / "kamailio.cfg", kamailio_config(shared, port, uas_port))
    binary = shutil.which("kamailio") or "/usr/sbin/kamailio"
    argv = [binary, "-f", str(config), "-P", str(work / "kamailio.pid"), "-w", str(work)]
    # -DD: stay in the foreground (still forking its workers), so SIGTERM to this process
    # stops them all; -m/-M: shared and private memory, MiB, as the peer README says.
    argv += ["-m", "1024", "-M", "32", "-DD"]
    proc = await procs.start(argv, work / "kamailio.log", cwd=work)
    await wait_udp_bound(port, proc, "Kamailio")
    await asyncio.sleep(0.5)  # its workers fork after the bind
    return proc


# --- files and figures ----------------------------------------------------------------------


def write_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A bench's result as indented JSON (bench/results/*.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-quantile (0 < q <= 1) of sorted values; NaN of none."""
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def spread(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    """Median, min and max of repeated rounds, rounded to `digits`."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }
