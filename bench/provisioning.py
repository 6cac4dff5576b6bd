"""Throughput of a large provisioning download through softrelay, on this machine.

    .venv/bin/python bench/provisioning.py [--mib 128] [--repeat 3] [--out FILE]

One file of `--mib` MiB, made lazily chunk by chunk, fetched by an aiohttp client in
the same process (uvloop), best of `--repeat` interleaved runs:

(a) direct: the client fetches it from a bare aiohttp server (the limit on this loop);
(b) by URL: through softrelay's relay route, the PBX configured by `provisioning_url`
    pointing at that server;
(c) tunnel: through softrelay, the PBX's `PbxTunnel` (mockphone/provisioning.py)
    serving it over the WebSocket tunnel with per-stream credit.

For (c) the peak of traced Python memory (tracemalloc, in a separate pass) shows that
the file is never held whole. Timing uses `time.perf_counter` only.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import write_result
from mockphone.provisioning import PbxTunnel, TunnelRequest, TunnelResponse
from privacy.clock import SystemClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import Services, build_app
from webapi.ratelimit import RateLimit

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "provisioning.json"
MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB


async def produce(size: int) -> AsyncIterator[bytes]:
    for start in range(0, size, len(BLOCK)):
        yield BLOCK[: min(len(BLOCK), size - start)]


async def fetch(session: aiohttp.ClientSession, url: str, size: int) -> float:
    started = time.perf_counter()
    received = 0
    async with session.get(url) as resp:
        assert resp.status == 200, resp.status
        async for chunk in resp.content.iter_chunked(256 * 1024):
            received += len(chunk)
    assert received == size, (received, size)
    return time.perf_counter() - started


async def run(size: int, repeat: int) -> dict[str, Any]:
    async def direct(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        async for chunk in produce(size):
            await resp.write(chunk)
        return resp

    async def tunnel_serve(request: TunnelRequest) -> TunnelResponse:
        return TunnelResponse(200, [("Content-Length", str(size))], produce(size))

    upstream_app = web.Application()
    upstream_app.router.add_get("/prov/{tail:.*}", direct)
    times: dict[str, list[float]] = {"direct": [], "url": [], "tunnel": []}
    with tempfile.TemporaryDirectory() as tmp:
        async with TestServer(upstream_app, host="127.0.0.1") as upstream:
            pbxs = (
                PbxSettings("0000001", "bench-secret"),
                PbxSettings("0000002", "", provisioning_url=str(upstream.make_url("/prov/"))),
            )
            services = Services(
                load_policy("auerproxy"),
                Keyring.generate(),
                Path(tmp),
                SystemClock(),
                sweep_interval=3600,
                push=PushSettings((), 10, 1, "com.example.bench"),
                sip=SipSettings(pbxs=pbxs),
                provisioning=ProvisioningSettings(rate=RateLimit(per_minute=0)),
            )
            async with TestServer(build_app(services), host="127.0.0.1") as relay:
                base = str(relay.make_url("")).rstrip("/")
                pbx = await PbxTunnel.connect(base, "0000001", "bench-secret", tunnel_serve)
                urls = {
                    "direct": str(upstream.make_url("/prov/file")),
                    "url": f"{base}/provisioning/0000002/file",
                    "tunnel": f"{base}/provisioning/0000001/file",
                }
                try:
                    async with aiohttp.ClientSession(auto_decompress=False) as session:
                        for _ in range(repeat):
                            for name, url in urls.items():
                                times[name].append(await fetch(session, url, size))
                        tracemalloc.start()
                        await fetch(session, urls["tunnel"], size)
                        _, peak = tracemalloc.get_traced_memory()
                        tracemalloc.stop()
                finally:
                    await pbx.close()
    best = {name: min(values) for name, values in times.items()}
    return {
        "mib": size // MiB,
        "mib_per_s": {name: round(size / MiB / t, 1) for name, t in best.items()},
        "tunnel_peak_traced_mib": round(peak / MiB, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    measured = uvloop.run(run(args.mib * MiB, args.repeat))
    rates = measured["mib_per_s"]
    print(f"{args.mib} MiB file, best of {args.repeat}, MiB/s")
    print(f"  {'(a) direct':<22}{rates['direct']:>10}")
    print(f"  {'(b) softrelay by URL':<22}{rates['url']:>10}")
    print(f"  {'(c) softrelay tunnel':<22}{rates['tunnel']:>10}")
    print(f"  tunnel peak traced memory: {measured['tunnel_peak_traced_mib']} MiB")
    result = {
        "bench": "provisioning",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        **measured,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
