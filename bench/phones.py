"""100,000 connected phones on one node: `serve --workers N`, phones in several processes.

    .venv/bin/python bench/phones.py [--steps 10000,25000,50000,100000] [--workers 7]
        [--clients 8] [--rate 50] [--window 60] [--keepalive 30] [--tls-share 0.5]
        [--out bench/results/phones.json]
    .venv/bin/python bench/phones.py --quick     # 2,000 and 5,000 phones, 2 workers

One `softrelay serve --workers N` (uvloop, SQLite, `[cluster]` on the run's own Redis,
the embedded push stand-ins in every worker, a TLS listener with a throwaway CA's
certificate), and `--clients` processes of `bench/phones_client.py`, each with its own
mock PBX (a serial of its own) and its share of the phones, over TCP and TLS mixed
(`--tls-share`), each phone from a loopback address of its own (127.1.0.1 on), so the
relay's default per-address limits hold. The open-file limit is 20,000 per process
here, so one worker holds at most ~19,000 flows: 100,000 phones need 6 workers or more
(the default 7), and each client stays under the limit too.

The config gives SIP most of each worker's descriptors: `[http] max_connections = 500`
(the delivery feeds and /metrics are all that use HTTP here), `[sip.limits]
max_connections = 19000`; everything else is `serve`'s default.

The ramp: for each count of `--steps`, the clients grow to it (digest REGISTERs through
the relay to their PBX; 503s are retried), then

1. **keep-alives alone** for one keep-alive period (`--keepalive`, 30 s: every phone
   pings once): the workers' CPU over the window, less their idle rate measured before
   the first phone, per ping answered: the CPU per keep-alive;
2. **calls** for `--window` seconds at `--rate` calls/s over all clients (the mix in
   `phones_client.py`: PBX to connected phone, PBX to a sleeping phone woken by push,
   phone to PBX), keep-alives going on: call success, set-up and wake latency.

Memory per phone: the workers' VmRSS summed, less that sum before the first phone,
over the connected phones. A step holds when 99.9% of its phones registered and
99.9% of its calls connected; the ramp stops at the first step that does not. Every
step records where the limit could be: the machine's CPU busy share (2 cores, shared
with whatever else runs), the workers' and clients' CPU, the flows per worker against
the file limit, memory available.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import resource
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    HOST,
    ROOT,
    Processes,
    cpu_seconds,
    free_port,
    metric_values,
    nearest_rank,
    raise_nofile,
    status_kib,
    write_file,
    write_result,
)
from bench.phones_client import SETUP_CONCURRENCY, ClientSpec
from bench.relay_cluster import Cluster, Workers, start_workers
from push.fakes.certs import ThrowawayCa

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "phones.json"
DOMAIN = "relay.test"
NODE_BASE = "phones"  # [cluster] node_id: worker i is phones-<i>
TARGET = 0.999
CLIENT = Path(__file__).resolve().parent / "phones_client.py"
SLEEPERS = 200  # wake-pool phones per client
ANSWER_TIMEOUT = 1200.0  # s for a client to answer a command (a grow of 12,500 phones)


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


class ClientProcess:
    """One `phones_client.py`, driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    async def ask(self, command: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(orjson.dumps(command) + b"\n")
            await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), ANSWER_TIMEOUT)
        if not line:
            await self.proc.wait()
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(
                f"client {self.proc.pid} ended (status {self.proc.returncode}); its log ends:\n"
                + "\n".join(tail)
            )
        answer: dict[str, Any] = orjson.loads(line)
        return answer


def config(
    work: Path, cluster: Cluster, serials: list[str], cert: Path, tls_port: int, lag_ms: int
) -> Path:
    pbxs = "".join(
        f'[[sip.pbx]]\nserial = "{s}"\nsecret = "file:{work / (s + ".secret")}"\n' for s in serials
    )
    text = (
        f'[server]\nmetrics_listen = "{HOST}:0"\n\n'
        "[logging]\nconsole = false\n\n"
        "[http]\nmax_connections = 500\n\n"
        f'[sip]\ndomain = "{DOMAIN}"\n\n'
        f'[sip.tls]\nport = {tls_port}\ncert = "{cert}"\n\n'
        "[sip.limits]\nmax_connections = 19000\n\n"
        f"[sip.overload]\nlag_ms = {lag_ms}\n\n"
        f"{pbxs}\n{cluster.section(NODE_BASE)}"
    )
    return write_file(work / "softrelay.toml", text)


COUNTERS = (
    "softrelay_sip_errors_total",
    "softrelay_wake_calls_total",
    "softrelay_gc_pause_seconds_count",
)
# Summed in milliseconds: the garbage collector's pauses, by generation.
SECONDS = ("softrelay_gc_pause_seconds_sum",)


async def counters(workers: Workers, session: aiohttp.ClientSession) -> Counter[str]:
    """COUNTERS summed over the workers, by name and labels."""
    found: Counter[str] = Counter()
    for port in workers.metrics_ports:
        async with session.get(f"http://{HOST}:{port}/metrics") as response:
            text = await response.text()
        for name in COUNTERS:
            for labels, value in metric_values(text, name).items():
                found[name + labels] += int(value)
        for name in SECONDS:
            for labels, value in metric_values(text, name).items():
                found[name + "_ms" + labels] += round(value * 1000)
    return found


async def worker_state(workers: Workers, session: aiohttp.ClientSession) -> dict[str, Any]:
    """Each worker's VmRSS and flows (its /metrics)."""
    pids = [p for p in workers.pids() if p != workers.server.proc.pid]
    rss = [status_kib(p, "VmRSS") for p in pids]
    flows = []
    for port in workers.metrics_ports:
        async with session.get(f"http://{HOST}:{port}/metrics") as response:
            text = await response.text()
        flows.append(int(sum(metric_values(text, "softrelay_sip_flows").values())))
    return {"pids": pids, "rss_kib": rss, "flows": flows}


async def redis_used_kib(url: str) -> int:
    """The run's Redis: memory its data takes (INFO used_memory): the cluster's share."""
    client = Redis.from_url(url)
    try:
        info = await client.info("memory")
    finally:
        await client.aclose()
    return int(info["used_memory"]) // 1024


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {
        "count": len(ordered),
        "p50": round(nearest_rank(ordered, 0.5), 1),
        "p99": round(nearest_rank(ordered, 0.99), 1),
        "max": round(ordered[-1], 1),
    }


async def measure(
    clients: list[ClientProcess],
    workers: Workers,
    session: aiohttp.ClientSession,
    seconds: float,
    rate: float,
    idle_rate: float,
) -> dict[str, Any]:
    """One window on every client at once; the workers' and the machine's CPU over it,
    and what their counters (errors by reason, wake outcomes) counted."""
    counted = await counters(workers, session)
    pids = [p for p in workers.pids() if p != workers.server.proc.pid]
    client_pids = [c.proc.pid for c in clients]
    cpu0, busy0, load0 = cpu_seconds(pids), machine_busy(), time.monotonic()
    client_cpu0 = cpu_seconds(client_pids)
    per_client = rate / len(clients)
    answers = await asyncio.gather(
        *(c.ask({"cmd": "window", "seconds": seconds, "rate": per_client}) for c in clients)
    )
    wall = time.monotonic() - load0
    cpu = cpu_seconds(pids) - cpu0
    busy1 = machine_busy()
    counted = await counters(workers, session) - counted
    pings = sum(a["pongs"] for a in answers)
    calls: dict[str, dict[str, Any]] = {}
    failed: Counter[str] = Counter()
    for a in answers:
        for kind, c in a["calls"].items():
            into = calls.setdefault(kind, {"attempted": 0, "connected": 0})
            into["attempted"] += c["attempted"]
            into["connected"] += c["connected"]
            failed.update({f"{kind}: {r}": n for r, n in c["failed"].items()})
    attempted = sum(c["attempted"] for c in calls.values())
    connected = sum(c["connected"] for c in calls.values())
    ping_failures: Counter[str] = Counter()
    for a in answers:
        ping_failures.update(a["ping_failures"])
    net = max(0.0, cpu - idle_rate * wall)
    return {
        "seconds": round(wall, 1),
        "rate": rate,
        "pings_answered": pings,
        "ping_failures": dict(ping_failures),
        "pong_p99_ms_worst_client": max((a["pong_p99_ms"] or 0) for a in answers),
        "pong_p50_ms_median_client": sorted(a["pong_p50_ms"] or 0 for a in answers)[
            len(answers) // 2
        ],
        "workers_cpu_seconds": round(cpu, 2),
        "workers_cpu_share": round(cpu / wall, 2),
        "clients_cpu_share": round((cpu_seconds(client_pids) - client_cpu0) / wall, 2),
        "machine_busy_share": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
        "cpu_us_per_keepalive": round(net / pings * 1e6, 1) if pings and rate == 0 else None,
        "calls": calls,
        "attempted": attempted,
        "connected": connected,
        "success": round(connected / attempted, 5) if attempted else None,
        "failed": dict(failed),
        "wake_ms": percentiles([v for a in answers for v in a["wake_ms"]]),
        "setup_ms": percentiles([v for a in answers for v in a["setup_ms"]]),
        "clients_rss_kib": sum(a["rss_kib"] for a in answers),
        "awake": sum(a["awake"] for a in answers),
        "redials": sum(a["redials"] for a in answers),
        "wake_retries": sum(a["wake_retries"] for a in answers),
        "clients_gc2": {
            "count": sum(a["gc2_count"] for a in answers),
            "total_ms": round(sum(a["gc2_total_ms"] for a in answers), 1),
            "max_ms": max((a["gc2_max_ms"] for a in answers), default=0.0),
        },
        "worker_counters": dict(sorted(counted.items())),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    nofile, why = raise_nofile()
    procs = Processes()
    steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="softrelay-bench-phones-") as tmp:
        work = Path(tmp)
        try:
            async with Cluster.started(work) as cluster, aiohttp.ClientSession() as session:
                ca = ThrowawayCa.create(work)
                cert, ca_file = ca.issue_server("sip.pem"), ca.write_cert("ca.pem")
                serials = [f"bench-{i:04d}" for i in range(args.clients)]
                for s in serials:
                    fd = os.open(work / f"{s}.secret", os.O_WRONLY | os.O_CREAT, 0o600)
                    with os.fdopen(fd, "w") as sink:
                        sink.write(secrets.token_urlsafe(24) + "\n")
                tls_port = free_port()
                cfg = config(work, cluster, serials, cert, tls_port, args.lag_ms)
                started = time.monotonic()
                workers = await start_workers(procs, work, cfg, cluster.env, args.workers)
                print(
                    f"serve --workers {args.workers} ready in {time.monotonic() - started:.1f} s",
                    flush=True,
                )
                await asyncio.sleep(2.0)  # the workers' start-up work settles
                pids = [p for p in workers.pids() if p != workers.server.proc.pid]
                cpu0, t0 = cpu_seconds(pids), time.monotonic()
                await asyncio.sleep(args.idle)
                idle_rate = (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
                per_client = math.ceil(max(args.steps) / args.clients)
                clients: list[ClientProcess] = []
                for i, serial in enumerate(serials):
                    spec = ClientSpec(
                        index=i,
                        host=HOST,
                        tcp_port=workers.server.ports["tcp"],
                        tls_port=tls_port,
                        http_url=workers.server.http_url,
                        ca_file=str(ca_file),
                        serial=serial,
                        secret_file=str(work / f"{serial}.secret"),
                        domain=DOMAIN,
                        first=i * per_client,
                        sleepers=args.sleepers,
                        tls_share=args.tls_share,
                        keepalive=args.keepalive,
                        seed=args.seed * 1000 + i,
                        workers=args.workers,
                        node_base=NODE_BASE,
                        setup_concurrency=args.setup_concurrency,
                    )
                    log = work / f"client-{i}.log"
                    proc = await procs.start(
                        [sys.executable, str(CLIENT), orjson.dumps(asdict(spec)).decode()],
                        log,
                        cwd=ROOT,
                        stdout_pipe=True,
                        stdin_pipe=True,
                    )
                    clients.append(ClientProcess(proc, log))
                opened = await asyncio.gather(*(c.ask() for c in clients))
                base = await worker_state(workers, session)
                base_rss = sum(base["rss_kib"])
                print(
                    f"{args.clients} clients linked, a delivery feed of each worker found "
                    f"with {sum(o['opened']['probes'] for o in opened)} probes; workers idle "
                    f"{idle_rate * 100:.1f}% CPU, RSS {base_rss / 1024:.0f} MiB in all",
                    flush=True,
                )
                for target in args.steps:
                    step = await one_step(
                        args, clients, workers, session, target, base_rss, idle_rate
                    )
                    step["redis_used_kib"] = await redis_used_kib(cluster.redis.url())
                    steps.append(step)
                    # What held so far, should the run be cut short.
                    write_result(args.out, {"partial": True, "steps": steps})
                    if not step["holds"]:
                        break
                with contextlib.suppress(Exception):
                    await asyncio.gather(*(c.ask({"cmd": "stop"}) for c in clients))
                for c in clients:
                    await procs.wait(c.proc, 30)
                status = await workers.server.stop(procs, 120)
                result = {
                    "serve_exit": status,
                    "idle_cpu_share": round(idle_rate, 4),
                    "base_rss_kib": base["rss_kib"],
                    "feed_probes": [o["opened"]["probes"] for o in opened],
                }
        finally:
            await procs.close()
    held = [s for s in steps if s["holds"]]
    return {
        "benchmark": "phones",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nofile_soft": nofile,
            "nofile_note": why,
            "mem_available_mib_at_end": mem_available_mib(),
            "shared": "other engineers' runs share the machine",
        },
        "config": {
            "workers": args.workers,
            "clients": args.clients,
            "steps": args.steps,
            "rate": args.rate,
            "window": args.window,
            "keepalive": args.keepalive,
            "tls_share": args.tls_share,
            "sleepers_per_client": args.sleepers,
            "overload_lag_ms": args.lag_ms,
            "setup_concurrency_per_client": args.setup_concurrency,
        },
        **result,
        "steps": steps,
        "largest_held": held[-1]["phones"] if held else 0,
    }


async def one_step(
    args: argparse.Namespace,
    clients: list[ClientProcess],
    workers: Workers,
    session: aiohttp.ClientSession,
    target: int,
    base_rss: int,
    idle_rate: float,
) -> dict[str, Any]:
    share = math.ceil(target / len(clients))
    started = time.monotonic()
    grown = await asyncio.gather(*(c.ask({"cmd": "grow", "to": share}) for c in clients))
    grow_s = time.monotonic() - started
    registered = sum(g["registered"] for g in grown)
    failed: Counter[str] = Counter()
    for g in grown:
        failed.update(g["register_failed"])
    await asyncio.sleep(2.0)
    state = await worker_state(workers, session)
    rss = sum(state["rss_kib"])
    print(
        f"{target:,}: {registered:,} registered in {grow_s:.0f} s "
        f"({sum(g['tls'] for g in grown):,} on TLS; failed {dict(failed)}), "
        f"flows per worker {state['flows']}, workers RSS {rss / 1024:.0f} MiB "
        f"({(rss - base_rss) * 1024 / max(1, registered):,.0f} B per phone)",
        flush=True,
    )
    quiet = await measure(clients, workers, session, args.keepalive, 0.0, idle_rate)
    print(
        f"  keep-alives alone {quiet['seconds']} s: {quiet['pings_answered']:,} pongs, "
        f"failures {quiet['ping_failures']}, "
        f"{quiet['cpu_us_per_keepalive']} µs worker CPU each, "
        f"pong p99 {quiet['pong_p99_ms_worst_client']} ms, "
        f"machine busy {quiet['machine_busy_share']:.0%}",
        flush=True,
    )
    calls = await measure(clients, workers, session, args.window, args.rate, idle_rate)
    after = await worker_state(workers, session)
    print(
        f"  calls {calls['seconds']} s at {args.rate:g}/s: "
        f"{calls['connected']}/{calls['attempted']} ({(calls['success'] or 0):.2%}), "
        f"wake p50/p99 {calls['wake_ms']['p50']}/{calls['wake_ms']['p99']} ms, "
        f"set-up p50/p99 {calls['setup_ms']['p50']}/{calls['setup_ms']['p99']} ms, "
        f"workers {calls['workers_cpu_share']:.0%} clients {calls['clients_cpu_share']:.0%} "
        f"machine {calls['machine_busy_share']:.0%}, failed {calls['failed']}, "
        f"worker counters {calls['worker_counters']}",
        flush=True,
    )
    holds = (
        registered >= TARGET * target
        and calls["success"] is not None
        and calls["success"] >= TARGET
    )
    record: dict[str, Any] = {
        "phones": target,
        "registered": registered,
        "register_failed": dict(failed),
        "register_retried": sum(g["retried"] for g in grown),
        "tls_phones": sum(g["tls"] for g in grown),
        "asleep_pool": sum(g["asleep"] for g in grown),
        "grow_seconds": round(grow_s, 1),
        "flows_per_worker": state["flows"],
        "flows_per_worker_after": after["flows"],
        "file_limit_per_process": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "workers_rss_kib": state["rss_kib"],
        "workers_rss_kib_after": after["rss_kib"],
        "bytes_per_phone": round((rss - base_rss) * 1024 / max(1, registered)),
        "keepalives": quiet,
        "calls": calls,
        "mem_available_mib": mem_available_mib(),
        "load_average": os.getloadavg(),
        "holds": holds,
    }
    record["limit_evidence"] = limit_evidence(record)
    return record


def limit_evidence(step: dict[str, Any]) -> list[str]:
    """What a step's figures say about the limit nearest: each resource near its end."""
    said = []
    if step["registered"] < TARGET * step["phones"]:
        said.append(
            f"registration: {step['registered']:,} of {step['phones']:,} "
            f"({step['register_failed']})"
        )
    most = max(step["flows_per_worker"])
    if most >= 0.95 * step["file_limit_per_process"]:
        said.append(
            f"file limit: a worker holds {most:,} flows of {step['file_limit_per_process']:,}"
        )
    for part in ("keepalives", "calls"):
        busy = step[part]["machine_busy_share"]
        if busy >= 0.9:
            said.append(
                f"CPU ({part}): the 2 cores {busy:.0%} busy, workers "
                f"{step[part]['workers_cpu_share']:.0%} and clients "
                f"{step[part]['clients_cpu_share']:.0%} of one core"
            )
    if step["mem_available_mib"] < 2048:
        said.append(f"memory: {step['mem_available_mib']:,} MiB available")
    calls = step["calls"]
    if calls["success"] is not None and calls["success"] < TARGET:
        said.append(f"calls: {calls['success']:.2%} connected ({calls['failed']})")
    if step["keepalives"]["ping_failures"] or calls["ping_failures"]:
        said.append(
            f"keep-alives unanswered: {step['keepalives']['ping_failures']} "
            f"then {calls['ping_failures']}"
        )
    return said


def _counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 5,000 phones, 2 workers")
    parser.add_argument("--steps", type=_counts, default=[10_000, 25_000, 50_000, 100_000])
    parser.add_argument("--workers", type=int, default=7)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=50.0, help="calls per second, all clients")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of calls per step")
    parser.add_argument("--keepalive", type=float, default=30.0)
    parser.add_argument("--tls-share", type=float, default=0.5)
    parser.add_argument("--sleepers", type=int, default=SLEEPERS, help="wake pool per client")
    parser.add_argument("--idle", type=float, default=10.0, help="s of idle workers' CPU")
    parser.add_argument(
        "--lag-ms", type=int, default=100, help="[sip.overload] lag_ms (serve's default 100)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--setup-concurrency",
        type=int,
        default=SETUP_CONCURRENCY,
        help="registrations in flight per client while a step grows",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.workers, args.clients = [2_000, 5_000], 2, 2
        args.window, args.rate, args.sleepers, args.idle = 20.0, 20.0, 100, 5.0
        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_OUT.with_name("phones-quick.json")
    result = asyncio.run(bench(args))
    write_result(args.out, result)
    print()
    for step in result["steps"]:
        calls, keep = step["calls"], step["keepalives"]
        print(
            f"{step['phones']:>7,} phones: {'HOLDS' if step['holds'] else 'FAILS'}; "
            f"{step['registered']:,} registered, {step['bytes_per_phone']:,} B/phone, "
            f"{keep['cpu_us_per_keepalive']} µs/keep-alive, calls {(calls['success'] or 0):.2%}, "
            f"wake p99 {calls['wake_ms']['p99']} ms"
        )
    print(f"largest count held at 99.9%: {result['largest_held']:,}")
    for step in result["steps"]:
        for line in step["limit_evidence"]:
            print(f"  at {step['phones']:,}: {line}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
