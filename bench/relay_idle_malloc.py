"""glibc's mmap threshold pinned (softrelay/allocator.py, as `serve` does) or left
dynamic, in interleaved rounds, on the bare uvloop TLS server of
bench/relay_idle_tls_designs.py:

- memory: bytes per idle TLS flow on a fresh server and after churn (500 connections
  that each sent 64 KiB and closed), as relay_idle_tls_designs.py reads them;
- CPU: the server's CPU (utime + stime, /proc) and minor page faults per connection of
  a churn loop: connect, TLS handshake, send `--send` bytes, close, one after another;
- Python's own allocations: a pure-Python workload in a process of its own (small
  objects, 1-64 KiB bytes, 256 KiB bytes), its CPU and peak RSS.

Pinned over dynamic per round; median and min-max of the ratios.

    python bench/relay_idle_malloc.py [--flows 3000] [--rounds 3] [--connections 1500]
        [--send 65536] [--out bench/results/relay_idle_malloc.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench.harness import HOST, free_port, raise_nofile  # noqa: E402
from bench.relay_idle_tls_designs import (  # noqa: E402
    CHURN_BYTES,
    CHURN_FLOWS,
    WARM,
    measure_design,
    start_server,
)
from bench.tls_chain import make_chain  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

_PYTHON_WORK = """
import resource, sys, time
if sys.argv[1] == "pin":
    from softrelay.allocator import pin_mmap_threshold
    assert pin_mmap_threshold()
start = time.process_time()
for _ in range(30):
    small = [{"key": i, "value": str(i), "list": [i, i]} for i in range(20_000)]
    medium = [b"x" * (1024 * (1 + i % 64)) for i in range(2_000)]
    large = [b"x" * (256 * 1024) for _ in range(40)]
    del small, medium, large
print(time.process_time() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _cpu_and_faults(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the name: state is field 3; minflt 10, utime 14, stime 15 (proc(5))
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[7])


def churn_cpu(chain_dir: Path, connections: int, send: int, pin: bool) -> dict[str, Any]:
    """The server's CPU seconds and minor faults per connection over `connections`
    connect-handshake-send-close cycles (after WARM of them, not counted)."""
    port = free_port()
    server = start_server("uvloop", chain_dir, port, pin)
    client = ssl.create_default_context(cafile=str(chain_dir / "root.pem"))
    payload = b"x" * send

    def cycle(count: int) -> None:
        for _ in range(count):
            with client.wrap_socket(
                socket.create_connection((HOST, port)), server_hostname="localhost"
            ) as sock:
                sock.sendall(payload)
                sock.setblocking(False)
                # Take in the tickets: a close with unread bytes would be a reset.
                with contextlib.suppress(ssl.SSLWantReadError):
                    sock.recv(1)

    try:
        cycle(WARM)
        cpu, faults = _cpu_and_faults(server.pid)
        cycle(connections)
        cpu_end, faults_end = _cpu_and_faults(server.pid)
        return {
            "pinned_mmap_threshold": pin,
            "connections": connections,
            "send_bytes": send,
            "server_cpu_us_per_connection": round((cpu_end - cpu) / connections * 1e6, 1),
            "server_minor_faults_per_connection": round((faults_end - faults) / connections, 1),
        }
    finally:
        server.kill()
        server.wait()


def python_work(pin: bool) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PYTHON_WORK, "pin" if pin else "dynamic"],
        capture_output=True,
        text=True,
        check=True,
        cwd=_HERE.parent,
    )
    cpu, peak = done.stdout.split()
    return {"pinned_mmap_threshold": pin, "cpu_s": float(cpu), "peak_rss_bytes": int(peak)}


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def run(flows: int, rounds: int, connections: int, send: int) -> dict[str, Any]:
    raise_nofile(2 * (flows + WARM + CHURN_FLOWS) + 1024)
    found: list[dict[str, Any]] = []
    ratios: dict[str, list[float]] = {"cpu": [], "faults": [], "python_cpu": [], "python_rss": []}
    with tempfile.TemporaryDirectory() as tmp:
        chain_dir = Path(tmp)
        make_chain(chain_dir)
        for number in range(rounds):
            order = (False, True) if number % 2 == 0 else (True, False)
            mem: dict[bool, list[dict[str, Any]]] = {}
            cpu: dict[bool, dict[str, Any]] = {}
            work: dict[bool, dict[str, Any]] = {}
            for pin in order:
                mem[pin] = [
                    measure_design("uvloop", chain_dir, flows, 0, pin),
                    measure_design("uvloop", chain_dir, flows, CHURN_BYTES, pin),
                ]
                cpu[pin] = churn_cpu(chain_dir, connections, send, pin)
                work[pin] = python_work(pin)
            for pin in (False, True):
                for row in (*mem[pin], cpu[pin], work[pin]):
                    found.append({"round": number, **row})
                    print(json.dumps(found[-1]), flush=True)
            ratios["cpu"].append(
                cpu[True]["server_cpu_us_per_connection"]
                / cpu[False]["server_cpu_us_per_connection"]
            )
            ratios["faults"].append(
                cpu[True]["server_minor_faults_per_connection"]
                / cpu[False]["server_minor_faults_per_connection"]
            )
            ratios["python_cpu"].append(work[True]["cpu_s"] / work[False]["cpu_s"])
            ratios["python_rss"].append(
                work[True]["peak_rss_bytes"] / work[False]["peak_rss_bytes"]
            )
    return {
        "flows": flows,
        "rounds": rounds,
        "churn": {"connections": CHURN_FLOWS, "bytes_each": CHURN_BYTES},
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "glibc": platform.libc_ver()[1],
        "pinned_over_dynamic": {name: _spread(values) for name, values in ratios.items()},
        "rows": found,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--flows", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--send", type=int, default=CHURN_BYTES)
    parser.add_argument("--out", type=Path, default=_HERE / "results" / "relay_idle_malloc.json")
    args = parser.parse_args(argv)
    result = run(args.flows, args.rounds, args.connections, args.send)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["pinned_over_dynamic"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
