"""SIP calls through softrelay against Kamailio and a direct call, on this machine.

    .venv/bin/python bench/relay.py [--rates 250,500,1000,2000,4000] [--seconds 8]
        [--refine 2] [--idle-flows 5000] [--idle-kinds tcp,tls,ws] [--only PARTS] [--profile]
        [--store sqlite,postgresql] [--rounds N] [--out bench/results/relay.json]

One run, on 127.0.0.1 over UDP, with SIPp (Debian sip-tester) on both ends. This module
is the command line, the order of the parts and the report; each part is a module:

- `bench/relay_calls.py`: (1) direct, (2) kamailio, (3) softrelay: calls climbing
  rising rates on each path (the goal: softrelay at least half of Kamailio's rate).
- `bench/relay_register.py`: (4) REGISTER/s through softrelay, with a PBX client that
  links by digest and answers every REGISTER; `--rounds` climbs per store in `--store`
  (SQLite, PostgreSQL), interleaved, each on a fresh softrelay and a fresh store.
- `bench/relay_idle.py`: (5) idle TCP, TLS and WebSocket flows held by one fresh
  server, memory per flow (the goals: 50,000 at under 10 KiB each; per flow TLS <= 16
  KiB, WebSocket <= 6 KiB, TCP <= 3 KiB). Run alone, it adds rounds, a baseline tree
  and tracemalloc (`python bench/relay_idle.py --help`).
- `bench/relay_cluster.py`: `--only cluster` (not in the default parts): Kamailio, one
  `serve` with and without `[cluster]`, `serve --workers 2` (calls, REGISTER) on a real
  Redis, and wake latency same-node against cross-node (`bench/relay_cluster_wake.py`),
  in interleaved rounds; its own result file (`--cluster-out`).
- `bench/relay_profile.py`: softrelay under cProfile for one step, with --profile and
  always when softrelay misses the goal.
- `bench/relay_sipp.py`: what they measure with: a SIPp step at one rate, the climb of
  rates with its bisections, the softrelay config they run against.
- `bench/harness.py`: what every bench shares: processes, ports, /proc, the open-file
  limit, the result file.

A step offers `rate * --seconds` calls at `rate` calls/s and passes when at least 99.9%
complete and the 200s come back at 95% of the offered rate or more; a path climbs
`--rates` to its first failed step, then runs `--refine` bisections. Every SIPp run is
bounded by -m and -timeout, and every wait by a timeout. Every process started here is
stopped at the end, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.*

from bench import relay_calls, relay_cluster, relay_idle, relay_register
from bench.harness import (
    HOST,
    ROOT,
    Processes,
    command_version,
    free_port,
    metric_values,
    raise_nofile,
    spread,
    start_softrelay,
    write_result,
)
from bench.profiling import positive_ints
from bench.relay_calls import LABELS, PATHS, TARGET_RATIO, ratio
from bench.relay_idle import IDLE_GOAL, IDLE_GOAL_BYTES, IDLE_KINDS, NOFILE_RESERVE, Idle
from bench.relay_profile import print_profile, profile
from bench.relay_register import DSN_ENV, STORES, Stores
from bench.relay_sipp import (
    PACE,
    QUIET_LIMIT,
    RECV_TIMEOUT_MS,
    REGISTER,
    SETTLE,
    STEP_MARGIN,
    SUCCESS,
    UAC,
    Sipp,
    Step,
    best,
    path_json,
    rate_between,
    relay_config,
    table_row,
)
from tests.pgserver import find_bindir
from tests.redisserver import find_binary as find_redis

DEFAULT_KAMAILIO_CFG = ROOT.parent / "shared" / "peers" / "kamailio-relay.cfg"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "relay.json"
DEFAULT_CLUSTER_OUT = Path(__file__).resolve().parent / "results" / "cluster.json"
# "cluster" (bench/relay_cluster.py: Redis, --workers, wake across nodes) only when asked.
PARTS = (*PATHS, "register", "idle", "cluster")
DEFAULT_PARTS = (*PATHS, "register", "idle")


@dataclass(frozen=True, slots=True)
class RegisterRound:
    """One REGISTER climb on a fresh softrelay with its store on `store`."""

    store: str
    registered: relay_register.Registers
    counters: dict[str, dict[str, float]]
    status: int

    def to_json(self) -> dict[str, Any]:
        return {
            **path_json(self.registered.steps),
            "note": self.registered.note,
            "pbx_answered": self.registered.pbx_answered,
            "softrelay_counters": self.counters,
            "server_exit_status": self.status,
        }


COUNTERS = (
    "softrelay_sip_errors_total",
    "softrelay_sip_messages_dropped_total",
    "softrelay_sip_handler_errors_total",
    "softrelay_sip_messages_total",
)


@dataclass(slots=True)
class Bench:
    """What the parts measured, as the report gives it."""

    paths: dict[str, list[Step]] = field(default_factory=dict)
    register: list[Step] = field(default_factory=list)
    register_note: str = ""
    pbx_answered: int = 0
    register_rounds: list[RegisterRound] = field(default_factory=list)
    postgresql: str = ""  # the version of the server the PostgreSQL rounds ran on
    idle: list[Idle] = field(default_factory=list)
    softrelay_counters: dict[str, dict[str, float]] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # exit status of each server
    cluster: relay_cluster.Results | None = None


async def bench(args: argparse.Namespace, procs: Processes, tmp: Path) -> Bench:
    """The parts in `args.only`, always in this order: the call paths (one SIPp UAS for
    all), the REGISTER rounds (a fresh softrelay each), the profile, the idle flows."""
    done = Bench()
    sipp = Sipp(procs, args.sipp, args.seconds, tmp / "sipp", transport=args.uac_transport)
    sipp.work.mkdir()
    secret = secrets.token_hex(16)
    secret_file = tmp / "pbx.secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    parts, rates, refine = args.only, args.rates, args.refine

    uas_port = free_port()
    uas = await sipp.start_uas(uas_port) if set(parts) & {*PATHS, "cluster"} else None
    try:
        if "direct" in parts:
            done.paths["direct"] = await relay_calls.direct(sipp, uas_port, rates, refine)
        if "kamailio" in parts:
            done.paths["kamailio"], done.statuses["kamailio"] = await relay_calls.through_kamailio(
                procs, sipp, args.kamailio_cfg, tmp / "kamailio", uas_port, rates, refine
            )
        if "softrelay" in parts:
            work = tmp / "softrelay"
            server = await start_softrelay(procs, work, relay_config(tmp, uas_port, secret_file))
            try:
                done.paths["softrelay"] = await relay_calls.through_softrelay(
                    sipp, server, rates, refine
                )
                text = await server.metrics()
                done.softrelay_counters = {name: metric_values(text, name) for name in COUNTERS}
            finally:
                done.statuses["softrelay"] = await server.stop(procs)
        if "register" in parts:
            await register_rounds(args, procs, sipp, tmp, secret, secret_file, done)
        if "cluster" in parts:
            done.cluster = await relay_cluster.run(
                procs,
                sipp,
                tmp,
                uas_port,
                args.kamailio_cfg,
                secret,
                secret_file,
                rates,
                refine,
                args.cluster_rounds,
                args.wake_calls,
            )
        relay_steps = done.paths.get("softrelay", [])
        below = (value := ratio(done.paths)) is not None and value < TARGET_RATIO
        if relay_steps and (args.profile or below):
            # At half its best rate: the profiler about doubles its cost per call.
            top = best(relay_steps)
            rate = max(10, rate_between(0, top.rate if top else relay_steps[0].rate))
            config = relay_config(tmp, uas_port, secret_file)
            keys = relay_calls.KEYS
            done.profile = await profile(procs, sipp, tmp, config, keys, rate)
    finally:
        if uas is not None:
            done.statuses["sipp_uas"] = await procs.stop(uas)

    if "idle" in parts:
        for kind in args.idle_kinds:
            for count in args.idle_flows:
                work = tmp / f"idle-{kind}-{count}"
                found = await relay_idle.idle_flows(procs, work, kind, count, secret_file)
                done.idle.append(found)
                print(f"  idle      {relay_idle.idle_line(found)}", flush=True)
    return done


async def register_rounds(
    args: argparse.Namespace,
    procs: Processes,
    sipp: Sipp,
    tmp: Path,
    secret: str,
    secret_file: Path,
    done: Bench,
) -> None:
    """`--rounds` REGISTER climbs per store, interleaved (sqlite, postgresql, sqlite, ...),
    each on a fresh softrelay with a fresh store; the first one fills the report's
    `register` as before."""
    async with Stores.started(args.store) as stores:
        done.postgresql = stores.version
        for turn in range(args.rounds):
            for store in args.store:
                work = tmp / f"register-{store}-{turn}"
                dsn_env = DSN_ENV if store == "postgresql" else None
                config = relay_config(work, None, secret_file, store_dsn_env=dsn_env)
                env = await stores.environment(store, procs, config, work)
                print(f"  REGISTER round {turn + 1}/{args.rounds} on {store}", flush=True)
                server = await start_softrelay(procs, work, config, env=env)
                try:
                    registered = await relay_register.registers(
                        sipp, server, secret, args.rates, args.refine
                    )
                    text = await server.metrics()
                    counters = {name: metric_values(text, name) for name in COUNTERS}
                finally:
                    status = await server.stop(procs)
                done.register_rounds.append(RegisterRound(store, registered, counters, status))
    first = done.register_rounds[0]
    done.register = first.registered.steps
    done.register_note = first.registered.note
    done.pbx_answered = first.registered.pbx_answered
    if "softrelay" not in args.only:
        done.softrelay_counters = first.counters
        done.statuses["softrelay"] = first.status


def register_by_store(done: Bench) -> dict[str, Any]:
    """Per store: the best REGISTER rate of every round, its median and spread; with
    both stores, PostgreSQL's over SQLite's round by round."""
    found: dict[str, Any] = {}
    best_rates: dict[str, list[float]] = {}
    for one in done.register_rounds:
        best_rates.setdefault(one.store, []).append(path_json(one.registered.steps)["best_per_s"])
    for store, rates in best_rates.items():
        found[store] = {
            "best_per_s_rounds": rates,
            "best_per_s": spread(rates, 1),
            "rounds": [one.to_json() for one in done.register_rounds if one.store == store],
        }
    if len(best_rates) == 2:
        pairs = zip(best_rates["postgresql"], best_rates["sqlite"], strict=True)
        per_round = [pg / lite if lite else 0.0 for pg, lite in pairs]
        found["ratio_postgresql_over_sqlite_rounds"] = [round(r, 3) for r in per_round]
        found["ratio_postgresql_over_sqlite"] = spread(per_round, 3)
    if done.postgresql:
        found["postgresql_version"] = done.postgresql
        found["postgresql_server"] = (
            "tests/pgserver.py on this machine's cores (loopback TCP, fsync off, "
            "synchronous_commit off); serve's default pool; the steps' CPU is the relay's only"
        )
    return found


def parse_stores(text: str) -> list[str]:
    stores = [part.strip() for part in text.split(",") if part.strip()]
    if not stores or set(stores) - set(STORES) or len(set(stores)) < len(stores):
        raise argparse.ArgumentTypeError(f"stores are {', '.join(STORES)}; got {text!r}")
    return stores


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
        type=relay_idle.parse_kinds,
        default=list(IDLE_KINDS),
        help="kinds of idle flow: tcp (SIP port), tls (SIP TLS port), ws (WebSocket at /sip)"
        " (tcp,tls,ws)",
    )
    parser.add_argument(
        "--only",
        type=parse_parts,
        default=list(DEFAULT_PARTS),
        help=f"parts ({','.join(PARTS)}; default all but cluster)",
    )
    parser.add_argument(
        "--uac-transport",
        choices=("u1", "un"),
        default="u1",
        help="SIPp UAC's -t: u1 one socket for all calls, un one per call (u1)",
    )
    parser.add_argument(
        "--cluster-rounds", type=int, default=3, help="cluster: interleaved rounds (3)"
    )
    parser.add_argument(
        "--wake-calls", type=int, default=30, help="cluster: wakes per mode per round (30)"
    )
    parser.add_argument(
        "--cluster-out", type=Path, default=DEFAULT_CLUSTER_OUT, help="cluster: JSON result"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile softrelay (also when it misses the goal)"
    )
    parser.add_argument(
        "--store",
        type=parse_stores,
        default=["sqlite"],
        help="REGISTER: the stores to run on, interleaved (sqlite; sqlite,postgresql)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="REGISTER climbs per store (1)")
    parser.add_argument("--sipp", default=shutil.which("sipp") or "sipp", help="SIPp binary")
    parser.add_argument(
        "--kamailio-cfg", type=Path, default=DEFAULT_KAMAILIO_CFG, help="the peer's config"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.refine < 0 or args.rounds < 1 or args.cluster_rounds < 1:
        parser.error(
            "--seconds must be positive, --refine 0 or more, --rounds and --cluster-rounds"
            " at least 1"
        )
    if args.wake_calls < 1:
        parser.error("--wake-calls must be at least 1")
    if "cluster" in args.only and find_redis() is None:
        parser.error("redis-server not found (apt-get install redis-server)")
    if any(later <= earlier for earlier, later in zip(args.rates, args.rates[1:], strict=False)):
        parser.error("--rates must rise")
    if shutil.which(args.sipp) is None:
        parser.error(f"SIPp not found ({args.sipp}): apt-get install sip-tester")
    if "register" in args.only and "postgresql" in args.store and find_bindir() is None:
        parser.error("PostgreSQL 15 not found (apt-get install postgresql-15): --store sqlite")
    if {"kamailio", "cluster"} & set(args.only) and shutil.which("kamailio") is None:
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
    climbs = sum(part in args.only for part in PATHS) + 1
    climbs += args.rounds * len(args.store) if "register" in args.only else 0
    # Per cluster round: four call paths, REGISTER, and the wakes (bounded apart).
    climbs += args.cluster_rounds * 5 if "cluster" in args.only else 0
    per_step = args.seconds + RECV_TIMEOUT_MS / 1000 + STEP_MARGIN + SETTLE + QUIET_LIMIT
    hard_limit = climbs * (len(args.rates) + args.refine) * per_step
    idle_s = sum(max(60.0, n / 250) for n in args.idle_flows)
    hard_limit += idle_s * len(args.idle_kinds) + 300
    if "cluster" in args.only:
        hard_limit += args.cluster_rounds * (relay_cluster.WAKE_ROUND_LIMIT + 60)

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


def report(args: argparse.Namespace, done: Bench, wall: float, nofile: int, tmp: Path) -> int:
    value = ratio(done.paths)
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
            "note": done.register_note or relay_register.NOTE,
            "pbx_answered": done.pbx_answered,
        },
        "register_by_store": register_by_store(done),
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
    cluster_passed = None
    if done.cluster is not None:
        found = relay_cluster.to_json(done.cluster, args.uac_transport, args.wake_calls)
        cluster_passed = found["pass"]
        keys = (
            *("timestamp", "python", "platform", "cpus", "versions", "transport", "scenarios"),
            *("kamailio", "step_seconds", "rates", "refine", "pass_rule", "latency"),
        )
        write_result(
            args.cluster_out, {**{k: result[k] for k in keys}, **found, "wall_s": round(wall, 1)}
        )
    if set(args.only) - {"cluster"}:
        write_result(args.out, result)

    if done.paths or done.register or done.register_note:
        print_calls(done)
    print_register_rounds(done)
    if value is not None:
        kamailio, mine = best(done.paths["kamailio"]), best(done.paths["softrelay"])
        assert kamailio is not None
        print(
            f"softrelay {mine.rate if mine else 0}/s / Kamailio {kamailio.rate}/s = {value:.2f}"
            f"   target >= {TARGET_RATIO}: {'PASS' if passed else 'FAIL'}"
        )
    for idle in done.idle:
        print(f"idle flows: {relay_idle.idle_line(idle)}")
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
    if done.cluster is not None:
        relay_cluster.print_report(found)
        print(f"wrote {args.cluster_out}")
    counters = {k: v for k, v in done.softrelay_counters.items() if v and "messages_total" not in k}
    for name, values in counters.items():
        print(f"softrelay {name}: {', '.join(f'{k} {v:g}' for k, v in values.items())}")
    verdict = (
        "no verdict (Kamailio or softrelay not run)"
        if value is None
        else ("PASS" if passed else "FAIL")
    )
    wrote = f"; wrote {args.out}" if set(args.only) - {"cluster"} else ""
    print(f"\n{verdict}; wall {wall:.0f} s{wrote}")
    if args.keep:
        print(f"logs kept in {tmp}")
    if cluster_passed is False:
        return 1
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
        print(
            table_row(relay_register.LABEL, REGISTER.name, done.register) if done.register else ""
        )
        if done.register_note:
            print(f"  REGISTER: {done.register_note}")
    print(
        "best/s: highest offered rate with >= 99.9% of calls complete and 200s at >= 95% of it "
        "(+: no rate failed); latency p50/p99 of that step; CPU: the relay's processes"
    )


def print_register_rounds(done: Bench) -> None:
    if len(done.register_rounds) < 2:
        return
    print("\nREGISTER rounds, interleaved, a fresh softrelay and store each:")
    for n, one in enumerate(done.register_rounds, start=1):
        label = f"{n}. {one.store}"
        print(table_row(label, REGISTER.name, one.registered.steps))
        if one.registered.note:
            print(f"  {one.registered.note}")
    found = register_by_store(done)
    for store in STORES:
        if store in found:
            best_per_s = found[store]["best_per_s"]
            print(
                f"{store}: best REGISTER/s median {best_per_s['median']:,.0f} "
                f"({best_per_s['min']:,.0f}-{best_per_s['max']:,.0f})"
            )
    if "ratio_postgresql_over_sqlite" in found:
        r = found["ratio_postgresql_over_sqlite"]
        print(f"postgresql/sqlite median {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
