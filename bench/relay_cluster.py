"""The cluster part of `bench/relay.py` (`--only cluster`): softrelay as nodes on Redis
against Kamailio and one process, in one run on the same CPUs.

One real redis-server for the run (`tests/redisserver.py`, the tests' own: loopback TCP
with a password, no persistence). The store is SQLite everywhere (each `serve`'s data
dir; the two workers of `serve --workers 2` share theirs, as the supervisor prepares it),
so the paths differ only in the cluster. `--cluster-rounds` rounds, interleaved; in each:

- calls (`bench/sipp/uac.xml` to the SIPp UAS, as the calls of `relay_calls.py`) through
  (k) Kamailio, (s) one `softrelay serve` without `[cluster]`, (c) one `serve` with
  `[cluster]` (a node alone: what Redis costs), (w) `serve --workers 2` with `[cluster]`;
  each a climb of `--rates` on a fresh server;
- (r) REGISTER/s through `serve --workers 2` (`relay_register.py`'s PBX and climb);
- wake latency same-node against cross-node (`bench/relay_cluster_wake.py`).

A step's verdict, the climb and the CPU per call are `relay_sipp.py`'s; the workers'
CPU is every worker's and the supervisor's. Per path the JSON has every round's best
rate and their median with min-max; the target (the issue): the workers' median at least
Kamailio's (ratio taken round by round, then its median).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import relay_calls, relay_cluster_wake, relay_register
from bench.harness import (
    HOST,
    NO_CONFIG,
    ROOT,
    SERVE,
    START_TIMEOUT,
    Processes,
    Softrelay,
    metric_values,
    process_tree,
    spread,
    start_softrelay,
    write_file,
)
from bench.relay_sipp import Sipp, Step, best, path_json, relay_config
from tests.redisserver import RedisServer

REDIS_ENV = "SOFTRELAY_BENCH_REDIS_URL"  # the config says redis = "env:...": never on disk
WORKERS = 2
CALL_PATHS = ("kamailio", "softrelay", "softrelay_cluster", "workers")
LABELS = {
    "kamailio": "UAC -> Kamailio -> UAS",
    "softrelay": "UAC -> softrelay (1 process, no Redis) -> UAS",
    "softrelay_cluster": "UAC -> softrelay (1 process, [cluster]) -> UAS",
    "workers": f"UAC -> softrelay serve --workers {WORKERS} -> UAS",
    "register_workers": f"REGISTER -> serve --workers {WORKERS} -> PBX",
}
TARGET_RATIO = 1.0  # the issue: the workers at least as many calls/s as Kamailio
WAKE_ROUND_LIMIT = relay_cluster_wake.ROUND_TIMEOUT + 60  # s: its nodes start and stop too
COUNTERS = ("softrelay_sip_errors_total", "softrelay_sip_messages_dropped_total")


@dataclass(slots=True)
class Cluster:
    """The run's Redis, and the cluster secret every node of the run shares."""

    redis: RedisServer
    secret_file: Path

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, tmp: Path) -> AsyncIterator[Cluster]:
        redis = RedisServer()
        try:
            await asyncio.to_thread(redis.start)
            secret_file = tmp / "cluster.secret"
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as sink:
                sink.write(secrets.token_hex(16) + "\n")
            yield cls(redis, secret_file)
        finally:
            await asyncio.to_thread(redis.close)

    @property
    def env(self) -> dict[str, str]:
        return {REDIS_ENV: self.redis.url()}

    def section(self, node_id: str) -> str:
        return (
            f'[cluster]\nredis = "env:{REDIS_ENV}"\nsecret = "file:{self.secret_file}"\n'
            f'node_id = "{node_id}"\ninternal_listen = "{HOST}:0"\n'
        )

    def config(
        self, work: Path, uas_port: int | None, pbx_secret: Path, node_id: str, workers: bool
    ) -> Path:
        """`relay_config`'s softrelay with `[cluster]`; for workers a metrics port each."""
        base = relay_config(work, uas_port, pbx_secret).read_text(encoding="utf-8")
        server = f'[server]\nmetrics_listen = "{HOST}:0"\n\n' if workers else ""
        return write_file(work / "softrelay.toml", server + base + "\n" + self.section(node_id))


# --- serve --workers ----------------------------------------------------------------------


@dataclass(slots=True)
class Workers:
    """A running `serve --workers N`: the supervisor as a `Softrelay` (shared ports), and
    each worker's own metrics port."""

    server: Softrelay
    metrics_ports: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        return process_tree(self.server.proc.pid)

    async def counters(self) -> dict[str, dict[str, float]]:
        """COUNTERS summed over the workers."""
        found: dict[str, dict[str, float]] = {}
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for port in self.metrics_ports:
                async with session.get(f"http://{HOST}:{port}/metrics") as response:
                    text = await response.text()
                for name in COUNTERS:
                    into = found.setdefault(name, {})
                    for labels, value in metric_values(text, name).items():
                        into[labels] = into.get(labels, 0.0) + value
        return found


async def start_workers(
    procs: Processes, work: Path, config: Path, env: dict[str, str], count: int = WORKERS
) -> Workers:
    """`serve --workers count` on ports 0, once every worker is ready."""
    log = write_file(work / "serve.log", "")
    data_dir = work / "data"
    argv = [*SERVE, "serve", "--config", str(config), "--data-dir", str(data_dir)]
    argv += ["--http-port", "0", "--sip-port", "0", "--workers", str(count)]
    proc = await procs.start(
        argv, log, cwd=ROOT, stdout_pipe=True, env={**os.environ, **env, **NO_CONFIG}
    )
    assert proc.stdout is not None
    server = Softrelay(proc, {}, log, data_dir)
    found = Workers(server)
    sink = log.open("a", encoding="utf-8")
    ready = False
    try:
        async with asyncio.timeout(START_TIMEOUT * 2):
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                sink.write(line)
                text = line.strip()
                if match := re.match(r"softrelay: sip udp\+tcp 127\.0\.0\.1:(\d+)$", text):
                    server.ports["udp"] = server.ports["tcp"] = int(match.group(1))
                elif match := re.match(r"softrelay: http://127\.0\.0\.1:(\d+) ", text):
                    server.ports["http"] = int(match.group(1))
                elif match := re.match(r"softrelay worker \d+: http://[\d.]+:(\d+)/metrics", text):
                    found.metrics_ports.append(int(match.group(1)))
                elif text == f"softrelay: {count} workers ready":
                    ready = True
                    break
    except BaseException:
        sink.close()
        await procs.stop(proc)
        raise

    async def drain(stream: asyncio.StreamReader) -> None:
        try:
            while line := await stream.readline():
                sink.write(line.decode(errors="replace"))
        finally:
            sink.close()

    server.drain = asyncio.create_task(drain(proc.stdout))
    if not ready or len(found.metrics_ports) != count:
        await server.stop(procs)
        raise RuntimeError(f"softrelay serve --workers {count} did not start; see {log}")
    return found


# --- the rounds ---------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """Every round's climb per path, the REGISTER climbs, the wake rounds."""

    paths: dict[str, list[list[Step]]] = field(default_factory=dict)
    register: list[relay_register.Registers] = field(default_factory=list)
    counters: dict[str, list[dict[str, dict[str, float]]]] = field(default_factory=dict)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    wake: list[relay_cluster_wake.WakeRound] = field(default_factory=list)
    load: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)

    def note_load(self, what: str) -> None:
        self.load.append((what, os.getloadavg()))


async def run(
    procs: Processes,
    sipp: Sipp,
    tmp: Path,
    uas_port: int,
    kamailio_cfg: Path,
    pbx_secret: str,
    pbx_secret_file: Path,
    rates: Sequence[int],
    refine: int,
    rounds: int,
    wake_calls: int,
) -> Results:
    """`rounds` interleaved rounds of every path, REGISTER with workers, and wakes."""
    done = Results()
    async with Cluster.started(tmp) as cluster:
        for turn in range(rounds):
            print(f"  cluster round {turn + 1}/{rounds}", flush=True)
            done.note_load(f"round {turn + 1} start")
            work = tmp / f"cluster-{turn}"
            steps, status = await relay_calls.through_kamailio(
                procs, sipp, kamailio_cfg, work / "kamailio", uas_port, rates, refine
            )
            done.paths.setdefault("kamailio", []).append(steps)
            done.statuses.setdefault("kamailio", []).append(status)

            for name, clustered in (("softrelay", False), ("softrelay_cluster", True)):
                home = work / name
                if clustered:
                    config = cluster.config(home, uas_port, pbx_secret_file, f"one-{turn}", False)
                else:
                    config = relay_config(home, uas_port, pbx_secret_file)
                env = cluster.env if clustered else {}
                server = await start_softrelay(procs, home, config, env=env)
                try:
                    steps = await relay_calls.through_softrelay(
                        sipp, server, rates, refine, name=name
                    )
                    text = await server.metrics()
                    counters = {n: metric_values(text, n) for n in COUNTERS}
                finally:
                    status = await server.stop(procs)
                done.paths.setdefault(name, []).append(steps)
                done.counters.setdefault(name, []).append(counters)
                done.statuses.setdefault(name, []).append(status)

            home = work / "workers"
            config = cluster.config(home, uas_port, pbx_secret_file, f"w{turn}", True)
            workers = await start_workers(procs, home, config, cluster.env)
            try:
                pids = workers.pids()
                steps = await relay_calls.through_softrelay(
                    sipp, workers.server, rates, refine, name="workers", pids=pids
                )
                done.paths.setdefault("workers", []).append(steps)
                done.note_load(f"round {turn + 1} register")
                registered = await relay_register.registers(
                    sipp, workers.server, pbx_secret, rates, refine, pids=pids
                )
                done.register.append(registered)
                done.counters.setdefault("workers", []).append(await workers.counters())
            finally:
                status = await workers.server.stop(procs)
            done.statuses.setdefault("workers", []).append(status)

            done.note_load(f"round {turn + 1} wake")
            done.wake.append(
                await relay_cluster_wake.wake_round(
                    procs, cluster.section, cluster.env, work / "wake", turn, wake_calls
                )
            )
        done.note_load("end")
    return done


# --- the report ---------------------------------------------------------------------------


def best_rates(rounds: list[list[Step]]) -> list[int]:
    return [top.rate if (top := best(steps)) else 0 for steps in rounds]


def per_round_ratio(over: list[int], under: list[int]) -> list[float]:
    return [a / b if b else 0.0 for a, b in zip(over, under, strict=True)]


def to_json(done: Results, transport: str, wake_calls: int) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    bests: dict[str, list[int]] = {}
    for name, rounds in done.paths.items():
        bests[name] = best_rates(rounds)
        paths[name] = {
            "label": LABELS[name],
            "best_per_s_rounds": bests[name],
            "best_per_s": spread(bests[name], 1),
            "rounds": [path_json(steps) for steps in rounds],
        }
    register_rates = [path_json(r.steps)["best_per_s"] for r in done.register]
    paths["register_workers"] = {
        "label": LABELS["register_workers"],
        "best_per_s_rounds": register_rates,
        "best_per_s": spread(register_rates, 1) if register_rates else None,
        "rounds": [
            {**path_json(r.steps), "note": r.note, "pbx_answered": r.pbx_answered}
            for r in done.register
        ],
    }
    ratios: dict[str, Any] = {}
    for over, under in (
        ("workers", "kamailio"),
        ("softrelay", "kamailio"),
        ("softrelay_cluster", "softrelay"),
        ("workers", "softrelay"),
    ):
        if over in bests and under in bests:
            values = per_round_ratio(bests[over], bests[under])
            ratios[f"{over}_over_{under}"] = {
                "rounds": [round(v, 3) for v in values],
                **spread(values, 3),
            }
    target = ratios.get("workers_over_kamailio")
    return {
        "benchmark": "softrelay as a cluster on Redis against Kamailio and one process",
        "uac_transport": transport,
        "store": "SQLite (each serve's data dir; the workers of --workers share theirs)",
        "redis": "tests/redisserver.py: Debian redis-server on loopback TCP, password, "
        "no persistence, on this machine's cores",
        "paths": paths,
        "ratios": ratios,
        "target": f"workers/Kamailio calls/s >= {TARGET_RATIO} (median of the per-round ratios)",
        "pass": None if target is None else target["median"] >= TARGET_RATIO,
        "wake": relay_cluster_wake.to_json(done.wake, wake_calls),
        "softrelay_counters": done.counters,
        "server_exit_status": done.statuses,
        "load_average": [
            {"at": what, "1m": one, "5m": five, "15m": fifteen}
            for what, (one, five, fifteen) in done.load
        ],
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"\nCluster (UAC -t {result['uac_transport']}; store {result['store']}):")
    print(f"{'path':50}{'best/s median (min-max)':>26}   rounds")
    for data in result["paths"].values():
        b = data["best_per_s"]
        text = "-" if b is None else f"{b['median']:,.0f} ({b['min']:,.0f}-{b['max']:,.0f})"
        rounds = ", ".join(f"{r:,}" for r in data["best_per_s_rounds"])
        print(f"{data['label']:50}{text:>26}   {rounds}")
    for name, r in result["ratios"].items():
        print(f"{name}: median {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) {r['rounds']}")
    relay_cluster_wake.print_report(result["wake"])
    loads = ", ".join(f"{x['at']} {x['1m']:.1f}" for x in result["load_average"])
    print(f"load average (1 min): {loads}")
    verdict = {None: "no verdict", True: "PASS", False: "FAIL"}[result["pass"]]
    print(f"{result['target']}: {verdict}")
