"""Crash ingest throughput, and our scrubbing against the SDK's own EventScrubber.

    .venv/bin/python bench/crashreports.py [--events N] [--concurrency C] [--out FILE]

Events are made by the stock sentry-sdk itself (a recording transport): an exception
raised through nested calls, 20 breadcrumbs, contexts, tags, extra and a request. Two
sizes: about 8 KiB of JSON (the issue's size: frames without local variables and source
lines, no list of installed modules) and about 16 KiB (the SDK's defaults: frames carry
their locals, which hold personal data too, and source lines). In one run, for each size:

(a) ingest: the crash routes as `softrelay serve` composes them (store and
    `add_crashreports`), alone in a subprocess (one process, uvloop, SQLite under a
    temporary directory) takes the events as gzip envelopes, the way the SDK sends
    them, from C concurrent connections of this process; envelopes/s from the first
    request to the last answer (each answered after its scrubbed event is committed).
(b) our chain (`crashreports.scrubber`) on the parsed events, in process, events/s.
(c) the SDK's `EventScrubber` (its defaults, and recursive=True) on the same events.
(d) how many of the planted values found in the raw event each scrubber leaves there.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gzip
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as `python bench/crashreports.py`, this file's folder comes first on sys.path and
# its name would hide the `crashreports` package: the repository root goes first instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import aiohttp  # noqa: E402 - after the sys.path fix above
import orjson  # noqa: E402
import sentry_sdk  # noqa: E402
from sentry_sdk.integrations.modules import ModulesIntegration  # noqa: E402
from sentry_sdk.scrubber import EventScrubber  # noqa: E402
from sentry_sdk.transport import Transport  # noqa: E402

from crashreports.scrubber import compile_chain  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "crashreports.json"
KEY = "0123456789abcdef0123456789abcdef"
PLANTED = (
    "alice.bench@example.org",
    "+49 151 23456789",
    "sip:benchuser@",
    "198.51.100.23",
    "2001:db8:5::9",
    "s3cr3t-pass",
    "tok-bench-7781",
    "/home/benchuser",
    "4111 1111 1111 1111",
    "bench-cookie",
)


class _Recorder(Transport):
    def __init__(self) -> None:
        super().__init__({"dsn": None})
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Any) -> None:
        for item in envelope.items:
            if item.type == "event":
                self.events.append(orjson.loads(item.payload.get_bytes()))


def _deep(level: int, user_email: str, password: str, profile: dict[str, Any]) -> None:
    if level == 0:
        raise ValueError(
            f"REGISTER sip:benchuser@pbx.example.com from 198.51.100.23 failed for "
            f"{user_email}, callback +49 151 23456789, log /home/benchuser/phone.log"
        )
    _deep(level - 1, user_email, password, profile)


def sdk_events(count: int, full: bool) -> list[dict[str, Any]]:
    """`count` events; `full`: with the SDK's defaults (locals, source lines, modules)."""
    recorder = _Recorder()
    sentry_sdk.init(
        transport=recorder,
        release="com.example.phone@2.4.1",
        max_breadcrumbs=30,
        include_local_variables=full,
        include_source_context=full,
        disabled_integrations=[] if full else [ModulesIntegration()],
    )
    try:
        for i in range(count):
            with sentry_sdk.new_scope() as scope:
                scope.set_tag("softrelay.opt_in", "yes")
                scope.set_user({"id": f"u{i}", "email": "alice.bench@example.org"})
                scope.set_context("device", {"model": "iPhone15,2", "name": "Alice's iPhone"})
                scope.set_context("os", {"name": "iOS", "version": "17.4.1"})
                scope.set_extra(
                    "account", {"auth_token": "tok-bench-7781", "card": "4111 1111 1111 1111"}
                )
                for n in range(20):
                    scope.add_breadcrumb(
                        category="ui.click",
                        message=f"tapped {n} calling +49 151 23456789 from 2001:db8:5::9",
                        data={"screen": "dialer", "session": "bench-cookie"},
                    )
                try:
                    _deep(8, "alice.bench@example.org", "s3cr3t-pass", {"n": i})
                except ValueError:
                    sentry_sdk.capture_exception()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    return recorder.events


def _rate(fn: Any, events: list[dict[str, Any]], repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        batch = [copy.deepcopy(e) for e in events]
        start = time.perf_counter()
        for event in batch:
            fn(event)
        best = max(best, len(batch) / (time.perf_counter() - start))
    return best


def _left(raw: dict[str, Any], scrubbed: dict[str, Any]) -> str:
    """Planted values left in `scrubbed`, of those in `raw` (locals hold some of them)."""
    before = orjson.dumps(raw, default=str).decode()
    after = orjson.dumps(scrubbed, default=str).decode()
    present = [value for value in PLANTED if value in before]
    return f"{sum(1 for value in present if value in after)}/{len(present)}"


async def ingest(events: list[dict[str, Any]], concurrency: int, tmp: Path) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--server",
        str(tmp / "var"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
    assert match, line
    url = f"http://127.0.0.1:{int(match.group(1))}/api/1/envelope/"
    bodies = []
    for event in events:
        payload = orjson.dumps(event)
        raw = b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload
        bodies.append(gzip.compress(raw, 6))
    headers = {
        "X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={KEY}",
        "Content-Encoding": "gzip",
        "Content-Type": "application/x-sentry-envelope",
    }
    queue = list(reversed(bodies))
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency)
        ) as session:

            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    async with session.post(url, data=body, headers=headers) as resp:
                        assert resp.status == 200, resp.status
                        await resp.read()

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        await proc.wait()
    return len(bodies) / elapsed


async def serve(data_dir: Path) -> None:
    """The ingest as `softrelay serve` composes it (store, crash routes), alone: one process."""
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from crashreports.service import add_crashreports
    from crashreports.settings import CrashSettings, Project
    from privacy.clock import SystemClock
    from privacy.keys import Keyring
    from privacy.policy import load_policy
    from privacy.store import Store

    store_key = web.AppKey("store", Store)
    registry_key = web.AppKey("registry", CollectorRegistry)
    chain = compile_chain(opt_in=None)
    settings = CrashSettings(projects=(Project("1", KEY, "dsn", chain),), rate_limit=10**9)
    app = web.Application()
    app[registry_key] = CollectorRegistry()

    async def store_ctx(app: web.Application) -> Any:
        app[store_key] = await Store.create(
            load_policy("auerproxy"), Keyring.generate(), data_dir, SystemClock()
        )
        yield
        await app[store_key].close()

    app.cleanup_ctx.append(store_ctx)
    add_crashreports(app, settings, SystemClock(), store=store_key, registry=registry_key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--server":
        import uvloop

        data_dir = Path(sys.argv[2])
        data_dir.mkdir(parents=True, exist_ok=True)
        uvloop.run(serve(data_dir))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    chain = compile_chain(opt_in=None)
    flat = EventScrubber()
    deep = EventScrubber(recursive=True)
    sizes: list[dict[str, Any]] = []
    for label, full in (("no locals, source lines, modules", False), ("SDK defaults", True)):
        sample = sdk_events(200, full)
        size = sum(len(orjson.dumps(e)) for e in sample) / len(sample)
        # Interleaved, so that other load on the machine falls on all three alike.
        rates: dict[str, float] = {"ours": 0.0, "flat": 0.0, "deep": 0.0}
        for _ in range(args.repeat):
            rates["ours"] = max(rates["ours"], _rate(chain, sample, 1))
            rates["flat"] = max(rates["flat"], _rate(flat.scrub_event, sample, 1))
            rates["deep"] = max(rates["deep"], _rate(deep.scrub_event, sample, 1))
        left_ours = _left(sample[0], chain(copy.deepcopy(sample[0])))
        e1: Any = copy.deepcopy(sample[0])
        e2: Any = copy.deepcopy(sample[0])
        flat.scrub_event(e1)
        deep.scrub_event(e2)
        events = [copy.deepcopy(sample[i % len(sample)]) for i in range(args.events)]
        for i, event in enumerate(events):
            event["event_id"] = f"{i:032x}"
        with tempfile.TemporaryDirectory() as tmp:
            ingested = asyncio.run(ingest(events, args.concurrency, Path(tmp)))
        sizes.append(
            {
                "label": label,
                "sdk_defaults": full,
                "mean_event_bytes": round(size),
                "ingest_envelopes_per_s": round(ingested),
                "our_scrub_events_per_s": round(rates["ours"]),
                "sdk_event_scrubber_per_s": round(rates["flat"]),
                "sdk_event_scrubber_recursive_per_s": round(rates["deep"]),
                "left_by_ours": left_ours,
                "left_by_sdk": _left(sample[0], e1),
                "left_by_sdk_recursive": _left(sample[0], e2),
            }
        )

    print(f"events: {args.events} per size, concurrency {args.concurrency}")
    print(f"{'measurement':<60}{'rate':>10}  planted values left")
    for row in sizes:
        print(f"-- events of {row['mean_event_bytes'] / 1024:.1f} KiB ({row['label']})")
        for name, rate, left in (
            (
                "(a) ingest: envelopes/s, one server process (gzip, stored)",
                "ingest_envelopes_per_s",
                "",
            ),
            ("(b) our scrubbing chain, events/s", "our_scrub_events_per_s", "left_by_ours"),
            (
                "(c) sentry-sdk EventScrubber (defaults), events/s",
                "sdk_event_scrubber_per_s",
                "left_by_sdk",
            ),
            (
                "(c) sentry-sdk EventScrubber(recursive=True), events/s",
                "sdk_event_scrubber_recursive_per_s",
                "left_by_sdk_recursive",
            ),
        ):
            shown = row[left] if left else "-"
            print(f"{name:<60}{row[rate]:>10,}  {shown}")
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "events": args.events,
        "concurrency": args.concurrency,
        "sizes": sizes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")


if __name__ == "__main__":
    main()
