"""The measuring instrument of `bench/relay.py`: SIPp runs at one offered rate, and the
climb of rising rates every call path (and REGISTER) goes through.

A step offers `rate * seconds` calls at `rate` calls/s. It passes when at least 99.9% of
the offered calls complete and the 200s come back at 95% of the offered rate or more.
The climb stops at the first failed step, then bisects between the last pass and that
failure. Latency is SIPp's response times (rtd 1: INVITE or REGISTER -> 200, rtd 2: BYE
-> 200) in whole ms; server CPU comes from /proc.

The softrelay configuration the scenarios run against lives here too: the static PBX
the SIPp UAS plays, and the PBX that links by digest for REGISTERs.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.harness import (
    HOST,
    Processes,
    cpu_seconds,
    free_port,
    nearest_rank,
    udp_receive_drops,
    wait_udp_bound,
    write_file,
)

SCENARIOS = Path(__file__).resolve().parent / "sipp"
UAC, UAS, REGISTER = SCENARIOS / "uac.xml", SCENARIOS / "uas.xml", SCENARIOS / "register.xml"
DOMAIN = "relay.test"
CALL_SERIAL = "0077"  # the static PBX: the SIPp UAS
REGISTER_SERIAL = "0078"  # the PBX that links by digest: a client in the bench process
SUCCESS = 0.999  # a step passes with at least this share of its calls complete...
PACE = 0.95  # ...answered at no less than this share of the offered rate
RECV_TIMEOUT_MS = 5000  # SIPp: a call waiting longer than this for a message fails
STEP_MARGIN = 20.0  # s beyond a step's calls and its receive timeout before it is killed
SETTLE = 1.0  # s of quiet between steps (the UAS keeps calls 4 s after their BYE)
QUIET_CPU = 0.1  # a relay using less of a CPU than this is done with the last step...
QUIET_LIMIT = 60.0  # ...which it must be within this many seconds
MAX_SOCKETS = 15_000  # SIPp -t un: its sockets at once (it refuses more than its RLIMIT)


def relay_config(
    work: Path,
    uas_port: int | None,
    secret_file: Path,
    *,
    http_connections: int | None = None,
    sip_connections: int | None = None,
    store_dsn_env: str | None = None,
) -> Path:
    """softrelay's config: the SIPp UAS on `uas_port` as the static PBX (if any), the
    digest PBX with its secret, no per-IP connection limit on SIP, no console log.
    With `http_connections`, the HTTP port's cap and no per-IP cap there either; with
    `sip_connections`, SIP's cap on connections; with `store_dsn_env`, the store on
    PostgreSQL, its DSN in that environment variable (else SQLite under the data dir)."""
    lines = [f'[sip]\ndomain = "{DOMAIN}"\n']
    if store_dsn_env is not None:
        lines.append(f'[store]\nbackend = "postgresql"\ndsn = "env:{store_dsn_env}"\n')
    if uas_port is not None:
        lines.append(f'[[sip.pbx]]\nserial = "{CALL_SERIAL}"\nstatic = "udp:{HOST}:{uas_port}"\n')
    lines.append(f'[[sip.pbx]]\nserial = "{REGISTER_SERIAL}"\nsecret = "file:{secret_file}"\n')
    sip_cap = "" if sip_connections is None else f"max_connections = {sip_connections}\n"
    lines.append(f"[sip.limits]\nmax_connections_per_ip = 0\n{sip_cap}")
    if http_connections is not None:
        lines.append(f"[http]\nmax_connections = {http_connections}\nmax_connections_per_ip = 0\n")
    lines.append("[logging]\nconsole = false\n")
    return write_file(work / "softrelay.toml", "\n".join(lines))


# --- one step -------------------------------------------------------------------------------


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
        p50, p99 = float(nearest_rank(ordered, 0.5)), float(nearest_rank(ordered, 0.99))
        mean = sum(ordered) / len(ordered)
        return cls(len(ordered), p50, p99, float(ordered[-1]), round(mean, 3))

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
    """SIPp (Debian sip-tester): the UAS every call path ends at, and UAC steps."""

    procs: Processes
    binary: str
    seconds: float
    work: Path
    runs: int = 0
    # The UAC's -t: "u1" one UDP socket for all calls; "un" one per call, so that calls
    # come from many source ports, as from many phones (SO_REUSEPORT workers are chosen
    # by a hash of the source address: from one socket, every call reaches one worker).
    transport: str = "u1"

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
            "-t",
            self.transport,
            # One socket per open call with "un": under SIPp's open-file limit (20,000 here).
            *(("-max_socket", str(MAX_SOCKETS)) if self.transport == "un" else ()),
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


# --- the climb ------------------------------------------------------------------------------


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


def path_json(steps: list[Step]) -> dict[str, Any]:
    top = best(steps)
    return {
        "best_per_s": top.rate if top else 0,
        "limit_found": not all(step.passed for step in steps),  # else it lies above
        "best_step": top.to_json() if top else None,
        "steps": [step.to_json() for step in steps],
    }
