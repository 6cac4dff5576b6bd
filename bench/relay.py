"""SIP calls through softrelay against Kamailio and a direct call, on this machine.

    .venv/bin/python bench/relay.py [--rates 250,500,1000,2000,4000] [--seconds 8]
        [--refine 2] [--idle-flows 5000] [--idle-kinds tcp,ws] [--only PARTS] [--profile]
        [--out bench/results/relay.json]

One run, on 127.0.0.1 over UDP, with SIPp (Debian sip-tester) on both ends: the caller
runs `bench/sipp/uac.xml`, the callee `bench/sipp/uas.xml`, the same two scenarios on
every path. A call is INVITE/180/200/ACK/BYE/200. The caller ignores a provisional
response that comes after the 200, so a call fails only when it does not complete.

(1) direct: SIPp UAC -> SIPp UAS, the limit of the two SIPp processes on this machine.
(2) kamailio: UAC -> Kamailio -> UAS. The shared peer configuration
    (../shared/peers/kamailio-relay.cfg, stateful t_relay, record-routing) is copied with
    this run's ports and started with -m 1024 -M 32.
(3) softrelay: UAC -> `softrelay serve` -> UAS. The UAS is the static PBX of serial
    0077 and the UAC calls sip:service@0077.relay.test.

Each path climbs rising call rates. A step offers `rate * --seconds` calls at `rate`
calls/s. It passes when at least 99.9% of the offered calls complete and the 200s come
back at 95% of the offered rate or more. The climb stops at the first failed step, then
`--refine` bisection steps between the last pass and that failure. Each path reports its
highest passing rate and that step's latency: SIPp's response times for INVITE->200 and
BYE->200, in whole ms (on the machine measured they came in steps of 4 ms). Server CPU
per call comes from /proc.

(4) REGISTER/s through softrelay. A PBX (a Python client in this process) links serial
    0078 over TCP with its SHA-256 digest secret and answers each forwarded REGISTER
    with 200. SIPp registers a new user for every REGISTER, so each one stores a
    binding. The same climb applies.
(5) idle flows: a fresh `softrelay serve` while this process holds `--idle-flows`
    connections to it that send nothing, one kind per server (`--idle-kinds`): TCP
    connections to the SIP port, or WebSockets to /sip on the HTTP port with the
    subprotocol `sip` (RFC 7118), each upgraded and then silent. The VmRSS of the
    server is read from /proc before and after; memory per flow is the delta / N.
    Kernel socket buffers are not in RSS. Both processes need a descriptor per flow:
    the open-file limit is raised, and where the hard limit cannot be raised the count
    is capped to fit, and the cap is reported.

With --profile, and always when softrelay misses the goal, one more step runs at half
its best rate through a fresh softrelay under cProfile. A wrapper around `serve` turns
the profiler on and off by signal, so the profile holds the calls only. It reports own
time per layer and the top functions, in µs per call.

The issue's goals: softrelay's call rate is at least half of Kamailio's, and one
process holds 50,000 idle flows at under 10 KiB each. Every SIPp run is bounded by -m
and -timeout, and every wait by a timeout. Every process started here is stopped at the
end, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import platform
import pstats
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
from aiohttp.connector import AddrInfoType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.*

from bench.profiling import Stats, own_time, positive_ints
from proxy.sip.framing import PONG, Keepalive, StreamFramer
from proxy.sip.message import Request, Response, SipParseError, make_response, parse

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = Path(__file__).resolve().parent / "sipp"
UAC, UAS, REGISTER = SCENARIOS / "uac.xml", SCENARIOS / "uas.xml", SCENARIOS / "register.xml"
DEFAULT_KAMAILIO_CFG = ROOT.parent / "shared" / "peers" / "kamailio-relay.cfg"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "relay.json"
HOST = "127.0.0.1"
DOMAIN = "relay.test"
CALL_SERIAL = "0077"  # the static PBX: the SIPp UAS
REGISTER_SERIAL = "0078"  # the PBX that links by digest: a client in this process
TARGET_RATIO = 0.5  # the issue: at least half of Kamailio's call rate
IDLE_GOAL = 50_000  # flows held by one process...
IDLE_GOAL_BYTES = 10 * 1024  # ...at under this many bytes each
SUCCESS = 0.999  # a step passes with at least this share of its calls complete...
PACE = 0.95  # ...answered at no less than this share of the offered rate
RECV_TIMEOUT_MS = 5000  # SIPp: a call waiting longer than this for a message fails
STEP_MARGIN = 20.0  # s beyond a step's calls and its receive timeout before it is killed
START_TIMEOUT = 30.0  # s for a server to come up
STOP_TIMEOUT = 15.0  # s for a server to end after SIGTERM, before SIGKILL
SETTLE = 1.0  # s of quiet between steps (the UAS keeps calls 4 s after their BYE)
QUIET_CPU = 0.1  # a relay using less of a CPU than this is done with the last step...
QUIET_LIMIT = 60.0  # ...which it must be within this many seconds
NOFILE_RESERVE = 1024  # descriptors the server needs besides its idle flows
PER_SOURCE = 20_000  # idle connections per source address (ephemeral ports: ~28,000)
CONNECTING = 64  # idle connections being opened at once (the listen backlog is 100)
IDLE_KINDS = ("tcp", "ws")  # TCP to the SIP port; WebSocket to /sip on the HTTP port
PATHS = ("direct", "kamailio", "softrelay")
PARTS = (*PATHS, "register", "idle")
LABELS = {
    "direct": "SIPp UAC -> SIPp UAS (limit)",
    "kamailio": "UAC -> Kamailio -> UAS",
    "softrelay": "UAC -> softrelay -> UAS",
    "register": "REGISTER: SIPp -> softrelay -> PBX",
}


# --- processes --------------------------------------------------------------------------


class Processes:
    """Every process this bench starts, each in its own session: `close` ends the ones
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
        env: dict[str, str] | None = None,
    ) -> asyncio.subprocess.Process:
        with log.open("ab") as sink:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
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


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now (Kamailio forks its workers at start)."""
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
    """User + system CPU of these processes so far."""
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


def command_version(argv: Sequence[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"


# --- SIPp --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Latency:
    """SIPp response times of one step, in ms (SIPp gives whole ms, here in 4 ms steps)."""

    count: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: list[int]) -> Latency | None:
        if not values:
            return None
        ordered = sorted(values)

        def rank(q: float) -> float:
            return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])

        mean = sum(ordered) / len(ordered)
        return cls(len(ordered), rank(0.5), rank(0.99), float(ordered[-1]), round(mean, 3))

    def text(self) -> str:
        return f"{self.p50:g}/{self.p99:g}"


@dataclass(frozen=True, slots=True)
class Step:
    """One SIPp UAC run at one offered rate."""

    rate: int  # offered calls (or REGISTERs) per second
    calls: int  # offered: SIPp's -m
    successful: int
    failed: int
    failures: dict[str, int]  # SIPp's Failed*(C) counters that are not 0
    retransmissions: int  # by the UAC: requests it sent again for want of an answer
    answered_per_s: float  # 200s to the INVITE (REGISTER) per second, first to last
    setup: Latency | None  # rtd 1: INVITE (REGISTER) sent -> 200 received
    bye: Latency | None  # rtd 2: BYE sent -> 200 received
    server_cpu_s: float | None  # of the relay's processes during the step
    udp_drops: int  # kernel receive-buffer drops during the step (whole machine)
    seconds: float
    status: int  # SIPp's exit status (0: every call succeeded)
    busy_after_s: float = 0.0  # how long the relay kept working once SIPp had ended
    bench_cpu_s: float = 0.0  # of this process: the PBX, for REGISTERs

    @property
    def success(self) -> float:
        return self.successful / self.calls if self.calls else 0.0

    @property
    def passed(self) -> bool:
        return self.success >= SUCCESS and self.answered_per_s >= PACE * self.rate

    @property
    def cpu_us_per_call(self) -> float | None:
        if self.server_cpu_s is None or not self.successful:
            return None
        return self.server_cpu_s / self.successful * 1e6

    def to_json(self) -> dict[str, Any]:
        def latency(value: Latency | None) -> dict[str, Any] | None:
            return (
                None
                if value is None
                else {
                    "count": value.count,
                    "p50_ms": value.p50,
                    "p99_ms": value.p99,
                    "max_ms": value.max,
                    "mean_ms": value.mean,
                }
            )

        cpu = self.cpu_us_per_call
        return {
            "offered_per_s": self.rate,
            "offered": self.calls,
            "successful": self.successful,
            "failed": self.failed,
            "success": round(self.success, 5),
            "answered_per_s": round(self.answered_per_s, 1),
            "passed": self.passed,
            "failures": self.failures,
            "uac_retransmissions": self.retransmissions,
            "setup_latency": latency(self.setup),
            "bye_latency": latency(self.bye),
            "server_cpu_us_per_call": None if cpu is None else round(cpu, 1),
            "udp_receive_buffer_drops": self.udp_drops,
            "seconds": round(self.seconds, 2),
            "relay_busy_after_s": round(self.busy_after_s, 1),
            "bench_process_cpu_s": round(self.bench_cpu_s, 2),
            "sipp_status": self.status,
        }


def read_stats(path: Path) -> dict[str, str]:
    """The last (final) line of SIPp's -trace_stat file, by column."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))


def read_rtts(directory: Path) -> dict[int, list[tuple[float, int]]]:
    """SIPp's -trace_rtt values by rtd number: (ms since start, response time ms)."""
    values: dict[int, list[tuple[float, int]]] = {}
    for path in directory.glob("*_rtt.csv"):
        for line in path.read_text(errors="replace").splitlines()[1:]:
            parts = line.split(";")
            if len(parts) >= 3 and parts[2].strip().isdigit():
                at, rtt, rtd = float(parts[0]), int(float(parts[1])), int(parts[2])
                values.setdefault(rtd, []).append((at, rtt))
    return values


def answered_rate(samples: list[tuple[float, int]]) -> float:
    """Answers per second from the first to the last one received."""
    if len(samples) < 2:
        return 0.0
    times = sorted(at for at, _ in samples)
    span = (times[-1] - times[0]) / 1000
    return (len(times) - 1) / span if span > 0 else 0.0


@dataclass(slots=True)
class Sipp:
    procs: Processes
    binary: str
    seconds: float
    work: Path
    runs: int = 0

    async def start_uas(self, port: int) -> asyncio.subprocess.Process:
        argv = [
            self.binary,
            "-sf",
            str(UAS),
            "-i",
            HOST,
            "-p",
            str(port),
            "-nostdin",
            # Bounds a UAS nobody stops; the bench stops it long before.
            "-timeout",
            "3600s",
        ]
        proc = await self.procs.start(argv, self.work / "uas.log", cwd=self.work)
        await wait_udp_bound(port, proc, "the SIPp UAS")
        return proc

    async def step(
        self,
        scenario: Path,
        target: str,
        rate: int,
        keys: dict[str, str],
        server_pids: Sequence[int] | None,
    ) -> Step:
        """`rate * seconds` calls of `scenario` at `rate` per second, to `target`."""
        self.runs += 1
        work = self.work / f"{self.runs:03d}-{scenario.stem}-{rate}"
        work.mkdir(parents=True)
        calls = max(1, round(rate * self.seconds))
        recv_timeout_s = RECV_TIMEOUT_MS / 1000
        limit = self.seconds + recv_timeout_s + STEP_MARGIN
        argv = [
            self.binary,
            target,
            "-sf",
            str(scenario),
            "-i",
            HOST,
            "-p",
            str(free_port()),
            "-s",
            "service",
            *(arg for key, value in keys.items() for arg in ("-key", key, value)),
            "-r",
            str(rate),
            "-m",
            str(calls),
            # Never throttled by its cap on open calls: overload shows as failures.
            "-l",
            str(math.ceil(rate * (recv_timeout_s + 5))),
            "-recv_timeout",
            str(RECV_TIMEOUT_MS),
            "-timeout",
            f"{math.ceil(limit - 5)}s",
            "-nostdin",
            "-trace_stat",
            "-stf",
            str(work / "stat.csv"),
            "-fd",
            "1",
            "-trace_rtt",
            "-rtt_freq",
            "100",
        ]
        drops = udp_receive_drops()
        cpu = cpu_seconds(server_pids) if server_pids is not None else 0.0
        own_cpu = time.process_time()
        started = time.perf_counter()
        proc = await self.procs.start(argv, work / "sipp.log", cwd=work)
        status = await self.procs.wait(proc, limit)
        seconds = time.perf_counter() - started
        server_cpu = cpu_seconds(server_pids) - cpu if server_pids is not None else None
        drops = udp_receive_drops() - drops
        own_cpu = time.process_time() - own_cpu

        stats = read_stats(work / "stat.csv") if (work / "stat.csv").exists() else {}

        def counter(name: str) -> int:
            text = stats.get(name, "0").strip()
            return int(text) if text.isdigit() else 0

        failures = {
            name.removeprefix("Failed").removesuffix("(C)"): counter(name)
            for name in stats
            if name.startswith("Failed") and name.endswith("(C)") and name != "FailedCall(C)"
        }
        rtts = read_rtts(work)
        return Step(
            rate=rate,
            calls=calls,
            successful=counter("SuccessfulCall(C)"),
            failed=counter("FailedCall(C)"),
            failures={k: v for k, v in failures.items() if v},
            retransmissions=counter("Retransmissions(C)"),
            answered_per_s=answered_rate(rtts.get(1, [])),
            setup=Latency.of([rtt for _, rtt in rtts.get(1, [])]),
            bye=Latency.of([rtt for _, rtt in rtts.get(2, [])]),
            server_cpu_s=server_cpu,
            udp_drops=drops,
            seconds=seconds,
            status=status,
            bench_cpu_s=own_cpu,
        )


def rate_between(low: int, high: int) -> int:
    """The middle of (low, high), rounded to a step of 50 (10 under 200 calls/s)."""
    grain = 50 if high > 200 else 10
    return round((low + high) / 2 / grain) * grain


async def quiet(pids: Sequence[int] | None) -> float:
    """Wait until the relay has worked off what it still holds (a backlog after an
    overloaded step would fail the next one); the seconds that took, at most QUIET_LIMIT."""
    started = time.perf_counter()
    await asyncio.sleep(SETTLE)
    if not pids:
        return 0.0
    interval = 0.5
    while time.perf_counter() - started < QUIET_LIMIT:
        cpu = cpu_seconds(pids)
        await asyncio.sleep(interval)
        if cpu_seconds(pids) - cpu < QUIET_CPU * interval:
            break
    return time.perf_counter() - started - SETTLE


async def climb(
    measure: Callable[[int], Awaitable[Step]],
    rates: Sequence[int],
    refine: int,
    name: str,
    pids: Sequence[int] | None,
) -> list[Step]:
    """Rising rates until a step fails, then `refine` bisections below that one. After
    each step the relay's processes (`pids`) must go quiet before the next one starts."""
    steps: list[Step] = []

    async def run(rate: int) -> Step:
        step = await measure(rate)
        step = replace(step, busy_after_s=await quiet(pids))
        steps.append(step)
        print(f"  {name:10}{progress_line(step)}", flush=True)
        return step

    low, high = 0, None
    for rate in rates:
        if (await run(rate)).passed:
            low = rate
        else:
            high = rate
            break
    for _ in range(refine if high is not None else 0):
        assert high is not None
        middle = rate_between(low, high)
        if not low < middle < high:
            break
        if (await run(middle)).passed:
            low = middle
        else:
            high = middle
    return steps


def best(steps: Sequence[Step]) -> Step | None:
    passed = [step for step in steps if step.passed]
    return max(passed, key=lambda step: step.rate) if passed else None


def progress_line(step: Step) -> str:
    cpu = step.cpu_us_per_call
    notes = [f"{k} {v}" for k, v in step.failures.items()]
    if step.answered_per_s < PACE * step.rate:
        notes.append(f"answered under {PACE:.0%} of offered")
    if step.udp_drops:
        notes.append(f"kernel dropped {step.udp_drops} datagrams")
    if step.busy_after_s >= 2:
        notes.append(f"relay busy {step.busy_after_s:.0f} s after")
    failures = ", ".join(notes)
    return (
        f"{step.rate:>6}/s  {step.successful:>6}/{step.calls:<6} "
        f"{step.answered_per_s:>7.0f}/s answered  setup p50/p99 "
        f"{step.setup.text() if step.setup else '-':>9} ms  "
        f"{'' if cpu is None else f'{cpu:.0f} µs CPU/call  '}"
        f"{'PASS' if step.passed else 'FAIL'}{f' ({failures})' if failures else ''}"
    )


# --- Kamailio ------------------------------------------------------------------------------


def write_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


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


# --- softrelay -----------------------------------------------------------------------------


@dataclass(slots=True)
class Softrelay:
    proc: asyncio.subprocess.Process
    ports: dict[str, int]  # udp, tcp, http
    log: Path
    drain: asyncio.Task[None] | None = None

    async def metrics(self) -> str:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"http://{HOST}:{self.ports['http']}/metrics"
            async with session.get(url) as response:
                return await response.text()

    async def stop(self, procs: Processes) -> int:
        status = await procs.stop(self.proc)
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


def softrelay_config(work: Path, uas_port: int | None, secret_file: Path) -> Path:
    lines = [f'[sip]\ndomain = "{DOMAIN}"\n']
    if uas_port is not None:
        lines.append(f'[[sip.pbx]]\nserial = "{CALL_SERIAL}"\nstatic = "udp:{HOST}:{uas_port}"\n')
    lines.append(f'[[sip.pbx]]\nserial = "{REGISTER_SERIAL}"\nsecret = "file:{secret_file}"\n')
    lines.append("[sip.limits]\nmax_connections_per_ip = 0\n")
    lines.append("[logging]\nconsole = false\n")
    return write_file(work / "softrelay.toml", "\n".join(lines))


async def start_softrelay(
    procs: Processes, work: Path, config: Path, profile: Path | None = None
) -> Softrelay:
    log = write_file(work / "serve.log", "")
    python = [sys.executable, "-m", "softrelay.cli"]
    if profile is not None:
        python = [sys.executable, "-c", PROFILED_SERVE, str(profile)]
    argv = [*python, "serve", "--config", str(config)]
    argv += ["--data-dir", str(work / "data"), "--http-port", "0", "--sip-port", "0"]
    env = {**os.environ, "SOFTRELAY_CONFIG": ""}
    proc = await procs.start(argv, log, cwd=ROOT, stdout_pipe=True, env=env)
    assert proc.stdout is not None
    server = Softrelay(proc, {}, log)
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
                elif line.startswith("softrelay: profile"):
                    break
            else:
                server.ports.clear()  # ended before its start-up report
    except BaseException:
        out.close()
        await procs.stop(proc)
        raise
    server.drain = asyncio.create_task(drain(proc.stdout, out))
    if set(server.ports) != {"udp", "tcp", "http"}:
        await server.stop(procs)
        raise RuntimeError(f"softrelay serve did not start; see {log}")
    return server


# --- (4) the PBX that REGISTERs answer ----------------------------------------------------


class Pbx:
    """A PBX linked to softrelay over one TCP connection: it answers the relay's digest
    challenge with its secret, then answers every phone REGISTER it is sent with 200."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.framer = StreamFramer()
        self.inbox: deque[bytes] = deque()
        self.answered = 0
        self.error = ""  # why it stopped answering, if it did before the end
        self.task: asyncio.Task[None] | None = None
        host, port = writer.get_extra_info("sockname")[:2]
        self.contact = f"<sip:{REGISTER_SERIAL}@{host}:{port};transport=tcp>"
        self.via_host = f"{host}:{port}"

    @classmethod
    async def link(cls, port: int, secret: str) -> Pbx:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
        pbx = cls(reader, writer)
        try:
            async with asyncio.timeout(10):
                status = await pbx._register(secret)
        except BaseException:
            writer.close()
            raise
        if status != 200:
            writer.close()
            raise RuntimeError(f"the PBX link was refused: {status}")
        pbx.task = asyncio.create_task(pbx._serve())
        return pbx

    async def _next(self) -> bytes:
        while not self.inbox:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("softrelay closed the PBX link")
            for item in self.framer.feed(data):
                if item is Keepalive.PING:
                    self.writer.write(PONG)
                elif isinstance(item, bytes):
                    self.inbox.append(item)
        return self.inbox.popleft()

    async def _register(self, secret: str) -> int:
        call_id = f"bench-link-{secrets.token_hex(6)}"

        def register(cseq: int, *extra: str) -> bytes:
            lines = [
                f"REGISTER sip:{DOMAIN} SIP/2.0",
                f"Via: SIP/2.0/TCP {self.via_host};branch=z9hG4bK-{secrets.token_hex(6)}",
                f"From: <sip:{REGISTER_SERIAL}@{DOMAIN}>;tag=link",
                f"To: <sip:{REGISTER_SERIAL}@{DOMAIN}>",
                f"Call-ID: {call_id}",
                f"CSeq: {cseq} REGISTER",
                "Max-Forwards: 70",
                f"Contact: {self.contact}",
                "Expires: 3600",
                *extra,
                "Content-Length: 0",
                "",
                "",
            ]
            return "\r\n".join(lines).encode()

        self.writer.write(register(1))
        challenge = parse(await self._next())
        assert isinstance(challenge, Response), challenge
        assert challenge.status == 401, challenge.status
        header = challenge.get("WWW-Authenticate") or ""
        params = dict(re.findall(r'(\w+)="?([^",]+)"?', header))
        name = {"MD5": "md5", "SHA-256": "sha256"}[params["algorithm"].upper()]

        def h(text: str) -> str:
            return hashlib.new(name, text.encode()).hexdigest()

        uri, nc, cnonce = f"sip:{DOMAIN}", "00000001", secrets.token_hex(8)
        ha1 = h(f"{REGISTER_SERIAL}:{params['realm']}:{secret}")
        answer = h(f"{ha1}:{params['nonce']}:{nc}:{cnonce}:auth:{h(f'REGISTER:{uri}')}")
        authorization = (
            f'Digest username="{REGISTER_SERIAL}", realm="{params["realm"]}", '
            f'nonce="{params["nonce"]}", uri="{uri}", response="{answer}", '
            f'algorithm={params["algorithm"]}, qop=auth, nc={nc}, cnonce="{cnonce}"'
        )
        self.writer.write(register(2, f"Authorization: {authorization}"))
        final = parse(await self._next())
        assert isinstance(final, Response)
        return final.status

    async def _serve(self) -> None:
        try:
            while True:
                message = parse(await self._next())
                if isinstance(message, Request) and message.method == "REGISTER":
                    contact = message.get("Contact") or self.contact
                    headers = [("Contact", f"{contact};expires=600"), ("Expires", "600")]
                    self.writer.write(make_response(message, 200, headers=headers).serialize())
                    self.answered += 1
                    await self.writer.drain()  # TCP back-pressure, as a real PBX has
        except (ConnectionError, SipParseError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.writer.close()
        with contextlib.suppress(OSError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


# --- (5) idle flows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Idle:
    kind: str  # "tcp" or "ws"
    wanted: int
    opened: int  # connections this process holds
    held: int  # flows of that kind the server counted (softrelay_sip_flows{transport=kind})
    rss_before_kib: int
    rss_after_kib: int
    hwm_kib: int  # the server's peak RSS
    connect_s: float
    errors: dict[str, int]

    @property
    def bytes_per_flow(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / self.held if self.held else 0

    @property
    def goal(self) -> bool:
        return self.held >= IDLE_GOAL and self.bytes_per_flow < IDLE_GOAL_BYTES

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "wanted": self.wanted,
            "opened": self.opened,
            "held_by_server": self.held,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "rss_peak_kib": self.hwm_kib,
            "bytes_per_flow": round(self.bytes_per_flow),
            "connect_s": round(self.connect_s, 2),
            "connect_errors": self.errors,
            "goal_50000_under_10_kib": self.goal,
        }


IDLE_NAMES = {"tcp": "TCP", "ws": "WebSocket"}
# Connections/s an idle step's time budget allows for: well under what was measured
# (TCP ~1,800/s, WebSocket ~1,100/s on 2 cores).
IDLE_RATE = {"tcp": 500, "ws": 250}


async def sip_flows(server: Softrelay, kind: str) -> int:
    values = metric_values(await server.metrics(), "softrelay_sip_flows")
    return int(values.get(f'{{transport="{kind}"}}', 0))


class TcpIdle:
    """Idle TCP connections to the SIP port, from many source addresses."""

    def __init__(self, server: Softrelay) -> None:
        self.port = server.ports["tcp"]
        self.sockets: list[socket.socket] = []

    @property
    def opened(self) -> int:
        return len(self.sockets)

    async def open(self, number: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # Many sources: one pair of addresses has ~28,000 ephemeral ports.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.0.{1 + number // PER_SOURCE}", 0))
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, self.port)), 10)
        except BaseException:
            sock.close()
            raise
        self.sockets.append(sock)

    async def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


class WsIdle:
    """Idle SIP WebSockets (RFC 7118): /sip on the HTTP port with the subprotocol `sip`,
    upgraded, then silent (no pings either way). One client session per source address."""

    def __init__(self, server: Softrelay) -> None:
        self.url = f"ws://{HOST}:{server.ports['http']}/sip"
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []

    @property
    def opened(self) -> int:
        return len(self.sockets)

    def _session(self, source: str) -> aiohttp.ClientSession:
        session = self.sessions.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(limit=0, socket_factory=bound_socket(source))
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            session = self.sessions[source] = aiohttp.ClientSession(
                connector=connector, timeout=timeout
            )
        return session

    async def open(self, number: int) -> None:
        session = self._session(f"127.0.0.{1 + number // PER_SOURCE}")
        ws = await asyncio.wait_for(
            session.ws_connect(self.url, protocols=("sip",), autoping=False, compress=0), 10
        )
        if ws.protocol != "sip":
            await ws.close()
            raise RuntimeError(f"the server chose the subprotocol {ws.protocol!r}")
        self.sockets.append(ws)

    async def close(self) -> None:
        """Every connection at once: closing the sessions closes their transports."""
        self.sockets.clear()
        for session in self.sessions.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.close(), 30)
        self.sessions.clear()


def bound_socket(source: str) -> Callable[[AddrInfoType], socket.socket]:
    """Sockets bound to `source`, their port chosen at connect (as for TCP above)."""

    def make(addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
        return sock

    return make


async def idle_flows(
    procs: Processes, work: Path, kind: str, count: int, secret_file: Path
) -> Idle:
    """`count` idle flows of `kind` to a fresh softrelay; its RSS before and after."""
    server = await start_softrelay(procs, work, softrelay_config(work, None, secret_file))
    clients = TcpIdle(server) if kind == "tcp" else WsIdle(server)
    try:
        pid = server.proc.pid
        # The first scrape and the first flow allocate too: not counted.
        await clients.open(0)
        await clients.close()
        async with asyncio.timeout(10):
            while await sip_flows(server, kind):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        before = status_kib(pid, "VmRSS")
        errors: Counter[str] = Counter()
        numbers = iter(range(count))
        budget = max(30.0, count / IDLE_RATE[kind])
        deadline = time.monotonic() + budget
        started = time.perf_counter()

        async def connect() -> None:
            for number in numbers:
                if time.monotonic() > deadline:
                    errors["budget"] += 1
                    continue
                try:
                    await clients.open(number)
                except (OSError, TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
                    errors[type(exc).__name__] += 1

        async with asyncio.TaskGroup() as group:
            for _ in range(CONNECTING):
                group.create_task(connect())
        connect_s = time.perf_counter() - started
        # Accepted by the kernel is not yet accepted by the server: wait for its count.
        held = 0
        async with asyncio.timeout(max(30.0, count / 1000)):
            while (held := await sip_flows(server, kind)) < clients.opened:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        after, hwm = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        held = await sip_flows(server, kind)
        opened = clients.opened
        return Idle(kind, count, opened, held, before, after, hwm, connect_s, dict(errors))
    finally:
        await clients.close()
        await server.stop(procs)


IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module


def raise_nofile(wanted: int) -> tuple[int, str]:
    """Raise this process's open-file limit (its children inherit it): the new soft limit,
    and why it is lower than `wanted` if it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
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


# --- profile -------------------------------------------------------------------------------------

_LAYERS = (
    ("proxy/sip/message.py", "SIP parse, validate and serialize (proxy/sip/message.py)"),
    ("proxy/sip/relay.py", "relay routing (proxy/sip/relay.py)"),
    ("proxy/sip/transport.py", "SIP transports, flows (proxy/sip/transport.py, flow.py)"),
    ("proxy/sip/flow.py", "SIP transports, flows (proxy/sip/transport.py, flow.py)"),
    ("prometheus_client", "metrics (prometheus_client)"),
    ("/asyncio/", "asyncio event loop and UDP transport"),
    ("/enum.py", "enum (Transport.value and friends)"),
    ("/logging/", "logging"),
    ("/base64.py", "HMAC and SHA-256 (flow tokens, branches)"),
    ("/hmac.py", "HMAC and SHA-256 (flow tokens, branches)"),
    ("/re/", "regular expressions"),
)
_BUILTINS = (
    ("epoll", "idle (epoll wait)"),
    ("sendto", "socket syscalls"),
    ("recvfrom", "socket syscalls"),
    ("_hashlib", "HMAC and SHA-256 (flow tokens, branches)"),
    ("hmac", "HMAC and SHA-256 (flow tokens, branches)"),
    ("b32", "base32 of flow tokens"),
    ("re.Pattern", "regular expressions"),
    ("_sre", "regular expressions"),
)


def profile_summary(path: Path, calls: int, top: int = 12) -> dict[str, Any]:
    """Own time per layer and the top functions of a profiled serve, µs per call."""
    table: Stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # untyped in pstats
    layers, functions = own_time(
        table, _LAYERS, _BUILTINS, other_builtins="other builtins (str, bytes, dict methods)"
    )
    cumulative: dict[str, float] = {}
    for (filename, line, name), (_, _, _, cumtime, _) in table.items():
        if "proxy/sip/" in filename and name in ("handle", "parse", "serialize", "validate"):
            short = f"{Path(filename).name}:{line} {name}"
            cumulative[short] = cumulative.get(short, 0.0) + cumtime
    busy = sum(v for k, v in layers.items() if not k.startswith("idle"))
    scale = 1e6 / calls if calls else 0.0
    return {
        "calls": calls,
        "busy_us_per_call": round(busy * scale, 1),
        "layers_us_per_call": {k: round(v * scale, 1) for k, v in layers.most_common()},
        "cumulative_us_per_call": {k: round(v * scale, 1) for k, v in cumulative.items()},
        "top_functions": [
            {"us_per_call": round(t * scale, 2), "calls": c, "function": f}
            for t, c, f in functions[:top]
        ],
    }


# --- the benchmark ---------------------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    paths: dict[str, list[Step]] = field(default_factory=dict)
    register: list[Step] = field(default_factory=list)
    register_note: str = ""
    pbx_answered: int = 0
    idle: list[Idle] = field(default_factory=list)
    softrelay_counters: dict[str, dict[str, float]] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # exit status of each server


def ratio(done: Bench) -> float | None:
    kamailio, relay = best(done.paths.get("kamailio", [])), done.paths.get("softrelay")
    if kamailio is None or relay is None:
        return None
    mine = best(relay)
    return (mine.rate if mine else 0) / kamailio.rate


async def bench(args: argparse.Namespace, procs: Processes, tmp: Path) -> Bench:
    done = Bench()
    sipp = Sipp(procs, args.sipp, args.seconds, tmp / "sipp")
    sipp.work.mkdir()
    secret = secrets.token_hex(16)
    secret_file = tmp / "pbx.secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    keys = {"domain": f"{CALL_SERIAL}.{DOMAIN}"}
    parts = args.only

    uas_port = free_port()
    uas = await sipp.start_uas(uas_port) if set(parts) & {*PATHS} else None
    try:
        if "direct" in parts:
            target = f"{HOST}:{uas_port}"
            done.paths["direct"] = await climb(
                lambda rate: sipp.step(UAC, target, rate, keys, None),
                args.rates,
                args.refine,
                "direct",
                None,
            )
        if "kamailio" in parts:
            port = free_port()
            kamailio = await start_kamailio(
                procs, args.kamailio_cfg, tmp / "kamailio", port, uas_port
            )
            try:
                pids = process_tree(kamailio.pid)
                target = f"{HOST}:{port}"
                done.paths["kamailio"] = await climb(
                    lambda rate: sipp.step(UAC, target, rate, keys, pids),
                    args.rates,
                    args.refine,
                    "kamailio",
                    pids,
                )
            finally:
                done.statuses["kamailio"] = await procs.stop(kamailio)
        if "softrelay" in parts or "register" in parts:
            work = tmp / "softrelay"
            server = await start_softrelay(
                procs, work, softrelay_config(tmp, uas_port, secret_file)
            )
            try:
                target, pids = f"{HOST}:{server.ports['udp']}", [server.proc.pid]
                if "softrelay" in parts:
                    done.paths["softrelay"] = await climb(
                        lambda rate: sipp.step(UAC, target, rate, keys, pids),
                        args.rates,
                        args.refine,
                        "softrelay",
                        pids,
                    )
                if "register" in parts:
                    await registers(args, done, sipp, server, secret)
                text = await server.metrics()
                for name in (
                    "softrelay_sip_errors_total",
                    "softrelay_sip_messages_dropped_total",
                    "softrelay_sip_handler_errors_total",
                    "softrelay_sip_messages_total",
                ):
                    done.softrelay_counters[name] = metric_values(text, name)
            finally:
                done.statuses["softrelay"] = await server.stop(procs)
        relay_steps = done.paths.get("softrelay", [])
        below = (value := ratio(done)) is not None and value < TARGET_RATIO
        if relay_steps and (args.profile or below):
            # At half its best rate: the profiler about doubles its cost per call.
            top = best(relay_steps)
            rate = max(10, rate_between(0, top.rate if top else relay_steps[0].rate))
            config = softrelay_config(tmp, uas_port, secret_file)
            done.profile = await profile(procs, sipp, tmp, config, keys, rate)
    finally:
        if uas is not None:
            done.statuses["sipp_uas"] = await procs.stop(uas)

    if "idle" in parts:
        for kind in args.idle_kinds:
            for count in args.idle_flows:
                work = tmp / f"idle-{kind}-{count}"
                done.idle.append(await idle_flows(procs, work, kind, count, secret_file))
                print(f"  idle      {idle_line(done.idle[-1])}", flush=True)
    return done


async def registers(
    args: argparse.Namespace, done: Bench, sipp: Sipp, server: Softrelay, secret: str
) -> None:
    try:
        pbx = await Pbx.link(server.ports["tcp"], secret)
    except (OSError, RuntimeError, AssertionError, TimeoutError, KeyError, SipParseError) as exc:
        done.register_note = f"skipped: the PBX could not link ({type(exc).__name__}: {exc})"
        return
    try:
        target, pids = f"{HOST}:{server.ports['udp']}", [server.proc.pid]

        def measure(rate: int) -> Awaitable[Step]:
            # A new user for every REGISTER: each stores a binding (no coalesced refresh).
            keys = {"domain": f"{REGISTER_SERIAL}.{DOMAIN}", "prefix": f"r{rate}"}
            return sipp.step(REGISTER, target, rate, keys, pids)

        done.register = await climb(measure, args.rates, args.refine, "register", pids)
    finally:
        done.pbx_answered = pbx.answered
        if pbx.error:
            done.register_note = f"the PBX stopped answering: {pbx.error}"
        await pbx.close()


# Runs `softrelay serve` with a profiler it enables on SIGUSR1 and dumps on SIGUSR2, so
# the profile holds the calls only, not the start-up. argv: PROFILE_FILE serve ...
PROFILED_SERVE = """
import cProfile, signal, sys
from softrelay.cli import main
profile, out = cProfile.Profile(), sys.argv.pop(1)
def dump(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
signal.signal(signal.SIGUSR2, dump)
sys.exit(main(sys.argv[1:]))
"""


async def profile(
    procs: Processes, sipp: Sipp, tmp: Path, config: Path, keys: dict[str, str], rate: int
) -> dict[str, Any]:
    """softrelay under cProfile for one step of calls at `rate`."""
    work = tmp / "profile"
    stats = work / "serve.prof"
    server = await start_softrelay(procs, work, config, profile=stats)
    try:
        server.proc.send_signal(signal.SIGUSR1)
        target, pids = f"{HOST}:{server.ports['udp']}", [server.proc.pid]
        step = await sipp.step(UAC, target, rate, keys, pids)
        server.proc.send_signal(signal.SIGUSR2)
        async with asyncio.timeout(30):
            while not stats.exists() or not stats.stat().st_size:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # written in one go; let it finish
    finally:
        await server.stop(procs)
    return {"rate": rate, "step": step.to_json(), **profile_summary(stats, step.successful)}


def idle_line(idle: Idle) -> str:
    errors = f", errors {idle.errors}" if idle.errors else ""
    return (
        f"{idle.held:>6,} of {idle.wanted:,} {IDLE_NAMES[idle.kind]} flows held, RSS "
        f"{idle.rss_before_kib / 1024:.1f} -> {idle.rss_after_kib / 1024:.1f} MiB: "
        f"{idle.bytes_per_flow / 1024:.2f} KiB per flow "
        f"(connected in {idle.connect_s:.1f} s{errors})"
    )


def parse_kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if set(kinds) - set(IDLE_KINDS) or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {', '.join(IDLE_KINDS)}; got {text!r}")
    return list(dict.fromkeys(kinds))


def parse_parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; got {text!r}")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        type=positive_ints,
        default=[250, 500, 1000, 2000, 4000],
        help="offered calls/s, rising, per path (250,500,1000,2000,4000)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of calls per step (8)")
    parser.add_argument(
        "--refine", type=int, default=2, help="bisection steps after a path's first failure (2)"
    )
    parser.add_argument(
        "--idle-flows",
        type=positive_ints,
        default=[5000],
        help="idle connections to hold, one fresh server per count and kind (5000; 5000,50000)",
    )
    parser.add_argument(
        "--idle-kinds",
        type=parse_kinds,
        default=list(IDLE_KINDS),
        help="kinds of idle flow: tcp (SIP port), ws (WebSocket at /sip) (tcp,ws)",
    )
    parser.add_argument(
        "--only", type=parse_parts, default=list(PARTS), help=f"parts ({','.join(PARTS)})"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile softrelay (also when it misses the goal)"
    )
    parser.add_argument("--sipp", default=shutil.which("sipp") or "sipp", help="SIPp binary")
    parser.add_argument(
        "--kamailio-cfg", type=Path, default=DEFAULT_KAMAILIO_CFG, help="the peer's config"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.refine < 0:
        parser.error("--seconds must be positive, --refine 0 or more")
    if any(later <= earlier for earlier, later in zip(args.rates, args.rates[1:], strict=False)):
        parser.error("--rates must rise")
    if shutil.which(args.sipp) is None:
        parser.error(f"SIPp not found ({args.sipp}): apt-get install sip-tester")
    if "kamailio" in args.only and shutil.which("kamailio") is None:
        parser.error("kamailio not found: apt-get install kamailio (or leave it out of --only)")

    # Both this process (the clients) and the server (it inherits the limit) hold one
    # descriptor per idle flow.
    nofile, why = raise_nofile(max(args.idle_flows) + 4096) if "idle" in args.only else (0, "")
    args.idle_note = ""
    if "idle" in args.only and max(args.idle_flows) > nofile - NOFILE_RESERVE:
        # One server process cannot hold more: measure the most it can.
        most = nofile - NOFILE_RESERVE
        args.idle_note = f"{max(args.idle_flows):,} asked, {most:,} measured: {why}"
        args.idle_flows = sorted({min(count, most) for count in args.idle_flows})

    # A safety net only: every step and every wait is bounded on its own.
    climbs = sum(part in args.only for part in (*PATHS, "register")) + 1
    per_step = args.seconds + RECV_TIMEOUT_MS / 1000 + STEP_MARGIN + SETTLE + QUIET_LIMIT
    hard_limit = climbs * (len(args.rates) + args.refine) * per_step
    idle_s = sum(max(60.0, n / 250) for n in args.idle_flows)
    hard_limit += idle_s * len(args.idle_kinds) + 300

    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))

    async def bounded() -> Bench:
        try:
            async with asyncio.timeout(hard_limit):
                return await bench(args, procs, tmp)
        finally:
            await procs.close()

    print(
        f"bench/relay.py: UDP on {HOST}, {args.seconds:g} s of calls per step, rates "
        f"{','.join(map(str, args.rates))} then {args.refine} bisections; logs in {tmp}",
        flush=True,
    )
    started = time.perf_counter()
    try:
        done = asyncio.run(bounded())
    finally:
        procs.kill_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - started
    return report(args, done, wall, nofile, tmp)


def path_json(steps: list[Step]) -> dict[str, Any]:
    top = best(steps)
    return {
        "best_per_s": top.rate if top else 0,
        "limit_found": not all(step.passed for step in steps),  # else it lies above
        "best_step": top.to_json() if top else None,
        "steps": [step.to_json() for step in steps],
    }


def report(args: argparse.Namespace, done: Bench, wall: float, nofile: int, tmp: Path) -> int:
    value = ratio(done)
    passed = value is not None and value >= TARGET_RATIO
    fifty = [idle for idle in done.idle if idle.wanted >= IDLE_GOAL]
    result: dict[str, Any] = {
        "benchmark": "SIP calls through softrelay, Kamailio and directly; idle flows",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": {
            "sipp": command_version([args.sipp, "-v"], r"SIPp (v[\w.-]*\w)"),
            "kamailio": command_version(["kamailio", "-v"], r"version: kamailio ([\w.]+)"),
        },
        "transport": "UDP, 127.0.0.1; everything on the same CPUs",
        "scenarios": {
            "uac": "bench/sipp/uac.xml: INVITE/200/ACK/BYE/200, a 1xx after the 200 ignored",
            "uas": "bench/sipp/uas.xml: SIPp's uas echoing Record-Route",
            "register": "bench/sipp/register.xml: one REGISTER, a new user each",
        },
        "kamailio": f"{args.kamailio_cfg} with this run's ports; -m 1024 -M 32",
        "step_seconds": args.seconds,
        "rates": args.rates,
        "refine": args.refine,
        "pass_rule": f">= {SUCCESS:.1%} of offered calls complete, 200s at >= {PACE:.0%} "
        "of the offered rate",
        "latency": "SIPp response times in whole ms (4 ms steps seen): setup = INVITE -> 200, "
        "bye = BYE -> 200",
        "paths": {name: path_json(steps) for name, steps in done.paths.items()},
        "target_ratio": TARGET_RATIO,
        "ratio_softrelay_over_kamailio": None if value is None else round(value, 3),
        "pass": passed,
        "register": {
            **path_json(done.register),
            "note": done.register_note
            or "PBX linked by SHA-256 digest over TCP answers 200 at once; a new user per "
            "REGISTER, so each stores a binding",
            "pbx_answered": done.pbx_answered,
        },
        "idle_flows": {
            "results": [idle.to_json() for idle in done.idle],
            "rlimit_nofile": nofile,
            "note": args.idle_note,
            "goal": f"{IDLE_GOAL} flows at < {IDLE_GOAL_BYTES // 1024} KiB each",
            "goal_pass": (all(idle.goal for idle in fifty) if fifty else None),
        },
        "softrelay_counters": done.softrelay_counters,
        "server_exit_status": done.statuses,
        "wall_s": round(wall, 1),
    }
    if done.profile:
        result["profile"] = done.profile
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")

    if done.paths or done.register or done.register_note:
        print_calls(done)
    if value is not None:
        kamailio, mine = best(done.paths["kamailio"]), best(done.paths["softrelay"])
        assert kamailio is not None
        print(
            f"softrelay {mine.rate if mine else 0}/s / Kamailio {kamailio.rate}/s = {value:.2f}"
            f"   target >= {TARGET_RATIO}: {'PASS' if passed else 'FAIL'}"
        )
    for idle in done.idle:
        print(f"idle flows: {idle_line(idle)}")
    if done.idle:
        if fifty:
            verdict = "PASS" if all(i.goal for i in fifty) else "FAIL"
        elif args.idle_note:
            verdict = "not measurable on this machine (below)"
        else:
            verdict = "not measured (--idle-flows 50000)"
        print(f"idle goal: {IDLE_GOAL:,} flows at < 10 KiB each: {verdict}")
        if args.idle_note:
            print(f"  idle flows: {args.idle_note}")
    if done.profile:
        print_profile(done.profile)
    counters = {k: v for k, v in done.softrelay_counters.items() if v and "messages_total" not in k}
    for name, values in counters.items():
        print(f"softrelay {name}: {', '.join(f'{k} {v:g}' for k, v in values.items())}")
    verdict = (
        "no verdict (Kamailio or softrelay not run)"
        if value is None
        else ("PASS" if passed else "FAIL")
    )
    print(f"\n{verdict}; wall {wall:.0f} s; wrote {args.out}")
    if args.keep:
        print(f"logs kept in {tmp}")
    return 0 if passed or value is None else 1


def print_calls(done: Bench) -> None:
    cpus = os.cpu_count()
    print(
        f"\nCalls: UAC bench/sipp/uac.xml (a 1xx after the 200 ignored), UAS "
        f"bench/sipp/uas.xml, UDP on {HOST}, {cpus} CPUs shared by all processes"
    )
    print(
        f"{'path':36}{'UAC scenario':>14}{'best/s':>8}{'answered/s':>12}{'calls ok':>16}"
        f"{'setup ms':>10}{'BYE ms':>9}{'CPU µs/call':>13}"
    )
    for name, steps in done.paths.items():
        print(table_row(LABELS[name], UAC.name, steps))
    if done.register or done.register_note:
        print(table_row(LABELS["register"], REGISTER.name, done.register) if done.register else "")
        if done.register_note:
            print(f"  REGISTER: {done.register_note}")
    print(
        "best/s: highest offered rate with >= 99.9% of calls complete and 200s at >= 95% of it "
        "(+: no rate failed); latency p50/p99 of that step; CPU: the relay's processes"
    )


def table_row(label: str, scenario: str, steps: list[Step]) -> str:
    top = best(steps)
    if top is None:
        lowest = progress_line(steps[0]).strip()
        return f"{label:36}{scenario:>14}{'none':>8}  (lowest rate failed: {lowest})"
    cpu = top.cpu_us_per_call
    # "+": every rate offered passed; the limit lies above the highest one.
    rate = f"{top.rate:,}{'+' if all(step.passed for step in steps) else ''}"
    return (
        f"{label:36}{scenario:>14}{rate:>8}{top.answered_per_s:>12,.0f}"
        f"{f'{top.successful}/{top.calls}':>16}{top.setup.text() if top.setup else '-':>10}"
        f"{top.bye.text() if top.bye else '-':>9}{'-' if cpu is None else f'{cpu:,.0f}':>13}"
    )


def print_profile(found: dict[str, Any]) -> None:
    print(
        f"\nprofile of softrelay at {found['rate']}/s under cProfile "
        f"({found['step']['successful']} calls): {found['busy_us_per_call']:,.0f} µs busy per "
        "call (the profiler inflates it); own time per layer, µs per call:"
    )
    for layer, us in found["layers_us_per_call"].items():
        print(f"  {layer:64}{us:>8.1f}")
    print("  cumulative:")
    for function, us in found["cumulative_us_per_call"].items():
        print(f"    {function[:62]:62}{us:>8.1f}")
    print("  top functions by own time, µs per call:")
    for function in found["top_functions"][:8]:
        print(f"    {function['function'][:62]:62}{function['us_per_call']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
