"""One fixed-rate step of SIPp calls through softrelay: the CPU each call costs it.

    .venv/bin/python bench/relay_step.py [--mode one|workers] [--rate 1000] [--seconds 8]
        [--uac-transport un|u1]

For comparing two versions of the relay on the real path (sockets, uvloop, SIPp), where
`bench/relay.py`'s climbs take minutes and its best rate moves in steps: run this file
from each version's tree in turn (its `ROOT` is the tree it lies in), several times,
and compare the CPU µs per call. `one`: one `serve` with `[cluster]` on a real Redis
(as `relay.py --only cluster`'s `softrelay_cluster`); `workers`: `serve --workers 2`,
with the frames the workers sent each other over the internal link per call (a UDP
response the kernel gave the other worker is forwarded there). The step's verdict is
`relay_sipp.py`'s; the CPU is that of the relay's processes over the step.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where bench/push.py would
# shadow the `push` package: put the repository there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import aiohttp  # noqa: E402 - after the sys.path fix above

from bench.harness import HOST, Processes, free_port, metric_values, start_softrelay  # noqa: E402
from bench.relay_calls import KEYS  # noqa: E402
from bench.relay_cluster import Cluster, start_workers  # noqa: E402
from bench.relay_sipp import UAC, Sipp  # noqa: E402

FRAMES = "softrelay_node_frames_total"


async def frames_out(ports: list[int]) -> float:
    """Frames the workers sent each other, summed over their metrics."""
    total = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for port in ports:
            async with session.get(f"http://{HOST}:{port}/metrics") as response:
                text = await response.text()
            total += sum(
                v for labels, v in metric_values(text, FRAMES).items() if 'way="out"' in labels
            )
    return total


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-step-") as name:
        tmp = Path(name)
        procs = Processes()
        try:
            sipp = Sipp(procs, args.sipp, args.seconds, tmp / "sipp", transport=args.uac_transport)
            sipp.work.mkdir()
            secret_file = tmp / "pbx.secret"
            secret_file.write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
            uas_port = free_port()
            await sipp.start_uas(uas_port)
            async with Cluster.started(tmp) as cluster:
                home = tmp / args.mode
                workers = args.mode == "workers"
                config = cluster.config(home, uas_port, secret_file, "bench", workers)
                if workers:
                    running = await start_workers(procs, home, config, cluster.env)
                    server, pids = running.server, running.pids()
                else:
                    server = await start_softrelay(procs, home, config, env=cluster.env)
                    pids = [server.proc.pid]
                try:
                    target = f"{HOST}:{server.ports['udp']}"
                    step = await sipp.step(UAC, target, args.rate, KEYS, pids)
                    frames = await frames_out(running.metrics_ports) if workers else 0.0
                finally:
                    await server.stop(procs)
        finally:
            await procs.close()
    cpu = step.cpu_us_per_call
    per_call = frames / step.successful if step.successful else 0.0
    print(
        f"{args.mode} {args.uac_transport} {args.rate}/s: {step.successful}/{step.calls} calls,"
        f" {cpu if cpu is None else round(cpu)} µs CPU/call,"
        f" {per_call:.2f} link frames/call, {'PASS' if step.passed else 'FAIL'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("one", "workers"), default="workers")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--uac-transport", choices=("u1", "un"), default="un")
    parser.add_argument("--sipp", default=shutil.which("sipp") or "sipp")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
