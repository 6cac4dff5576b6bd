"""softrelay under cProfile for one step of calls, and the summary of that profile.

With --profile, and always when softrelay misses the goal, `bench/relay.py` runs one
more step at half softrelay's best rate through a fresh `serve` under cProfile. A
wrapper around `serve` turns the profiler on and off by signal, so the profile holds the
calls only. It reports own time per layer and the top functions, in µs per call.
"""

from __future__ import annotations

import asyncio
import pstats
import signal
import sys
from pathlib import Path
from typing import Any

from bench.harness import HOST, Processes, start_softrelay
from bench.profiling import Stats, own_time
from bench.relay_sipp import UAC, Sipp

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
    command = (sys.executable, "-c", PROFILED_SERVE, str(stats))
    server = await start_softrelay(procs, work, config, command=command)
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


_TRANSPORTS = "SIP transports, flows (proxy/sip/transport*.py, udp, streams, link, flow)"
# (part of a file name, its layer): the first that matches names it. The SIP message
# and transport layers each span several modules since proxy/sip was split by seam.
_MESSAGE = "SIP parse, validate and serialize (proxy/sip: message, parser, syntax, ...)"
_TRANSPORT = "SIP transports, flows (proxy/sip: transports, udp, streams, flow, ...)"
_LAYERS = (
    *(
        (f"proxy/sip/{name}.py", _MESSAGE)
        for name in ("message", "parser", "syntax", "uri", "headers", "params", "responses")
    ),
    ("proxy/sip/relay.py", "relay routing (proxy/sip/relay.py)"),
    *(
        (f"proxy/sip/{name}", _TRANSPORT)
        for name in ("transport", "udp.py", "streams.py", "link.py", "tls.py", "flow.py")
    ),
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
