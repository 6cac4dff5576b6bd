"""Wake latency on one node against across two (`bench/relay_cluster.py`'s wake part).

Two `softrelay serve` processes, nodes A and B of one cluster (the run's Redis, the
same cluster secret, SQLite each, each its own ports and its own embedded push
stand-ins), started fresh each round. Separate processes, not `--workers`: each worker
would run its own stand-ins, and the delivery feed on a shared HTTP port would reach one
worker at random. This process plays the parties with the shipped mock parties
(`mockphone/`) over TCP: the PBX linked on A; iOS phones (APNs tokens in their Contact,
RFC 8599) registered on A ("same node") or on B ("cross node"), then asleep (flow
closed). Then the PBX calls them one at a time, the two kinds alternating:

- same node: INVITE -> A parks and pushes -> the phone re-registers on A -> A delivers;
- cross node: INVITE -> A forwards along the Path (a token of B) over the internal link
  -> B parks and pushes -> the phone re-registers on B (B forwards the REGISTER to the
  PBX on A) -> B delivers, the 180 goes back through A.

"push": the moment the push reaches this process on the stand-ins' delivery feed (the
WebSocket `/stand-ins/v1/deliveries`) of the node that pushed: it follows both nodes'
feeds, so the feed's own hop is inside the figure. "delivery": the woken phone's 180
back at the PBX (`CallResult.wake_seconds`, INVITE sent -> that 180). Both from the
moment the PBX sends the INVITE. One wake at a time: the latency of a wake, not of a
burst (`bench/wake.py` measures bursts, in one process).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import HOST, Processes, Softrelay, nearest_rank, start_softrelay, write_file
from bench.relay_sipp import DOMAIN, REGISTER_SERIAL
from mockphone.delays import Pace
from mockphone.pbx import MockPbx
from mockphone.phone import NO_DELAY, Kind, MockPhone, PhoneSpec
from mockphone.pushes import Push, PushInbox, PushKind
from mockphone.sip import RelayAddress, Transport

MODES = ("same_node", "cross_node")
RING_TIMEOUT = 10.0  # s a call rings before the PBX gives up
ROUND_TIMEOUT = 120.0


class TimedInbox(PushInbox):
    """A push inbox that notes when each token's first call push arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.first_call: dict[str, float] = {}

    def put(self, token: str, push: Push | None) -> None:
        if push is not None and push.kind is PushKind.CALL:
            self.first_call.setdefault(token, time.monotonic())
        super().put(token, push)


@dataclass(slots=True)
class Wake:
    mode: str
    status: int
    push_s: float | None
    delivery_s: float | None


@dataclass(slots=True)
class WakeRound:
    wakes: list[Wake] = field(default_factory=list)
    error: str = ""
    statuses: list[int] = field(default_factory=list)


def _config(work: Path, section: Callable[[str], str], pbx_secret: Path, node_id: str) -> Path:
    return write_file(
        work / "softrelay.toml",
        f'[sip]\ndomain = "{DOMAIN}"\n\n'
        f'[[sip.pbx]]\nserial = "{REGISTER_SERIAL}"\nsecret = "file:{pbx_secret}"\n\n'
        "[sip.limits]\nmax_connections_per_ip = 0\n\n[logging]\nconsole = false\n\n"
        + section(node_id),
    )


def _secret_file(work: Path, secret: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pbx.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as sink:
        sink.write(secret + "\n")
    return path


def _address(server: Softrelay) -> RelayAddress:
    return RelayAddress(HOST, server.ports["tcp"], server.http_url)


async def wake_round(
    procs: Processes,
    section: Callable[[str], str],
    env: dict[str, str],
    work: Path,
    turn: int,
    calls: int,
) -> WakeRound:
    """`calls` wakes of each mode on fresh nodes A and B of the cluster whose `[cluster]`
    `section(node_id)` gives, `env` naming its Redis; a failure is noted, not raised."""
    done = WakeRound()
    secret = secrets.token_urlsafe(24)
    secret_file = _secret_file(work, secret)
    nodes: list[Softrelay] = []
    try:
        for name in ("a", "b"):
            home = work / name
            config = _config(home, section, secret_file, f"wake{turn}-{name}")
            nodes.append(await start_softrelay(procs, home, config, env=env))
        async with asyncio.timeout(ROUND_TIMEOUT):
            await _wakes(nodes[0], nodes[1], secret, calls, done)
    except (OSError, RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
        done.error = f"{type(exc).__name__}: {exc}"
        print(f"  wake round failed: {done.error}", flush=True)
    finally:
        for node in nodes:
            done.statuses.append(await node.stop(procs))
    return done


async def _wakes(a: Softrelay, b: Softrelay, secret: str, calls: int, done: WakeRound) -> None:
    rng = random.Random(calls)  # no secrets: the pace's draws
    pace = Pace(math.inf, rng)
    async with aiohttp.ClientSession() as session:
        inbox = TimedInbox()
        await inbox.follow(a.http_url, session)
        await inbox.follow(b.http_url, session)
        pbx = await MockPbx.connect(
            _address(a),
            serial=REGISTER_SERIAL,
            secret=secret,
            domain=DOMAIN,
            users={},
            ring_timeout=RING_TIMEOUT,
        )
        phones: dict[str, list[MockPhone]] = {mode: [] for mode in MODES}
        try:
            for mode, node in zip(MODES, (a, b), strict=True):
                for i in range(calls):
                    user = f"{mode}-{i}"
                    password = secrets.token_urlsafe(12)
                    pbx.add_user(user, password)
                    spec = PhoneSpec(
                        user, password, Kind.IOS, Transport.TCP, keepalive=0, wake_delay=NO_DELAY
                    )
                    phone = MockPhone(
                        spec, _address(node), serial=REGISTER_SERIAL, domain=DOMAIN,
                        inbox=inbox, pace=pace,
                    )  # fmt: skip
                    status = await phone.start()
                    if status != 200:
                        raise RuntimeError(f"{user} registered with {status}")
                    await phone.sleep()
                    phones[mode].append(phone)
            await asyncio.sleep(0.5)  # the nodes close the sleeping phones' flows
            for i in range(calls):
                for mode in MODES if i % 2 == 0 else reversed(MODES):
                    phone = phones[mode][i]
                    started = time.monotonic()
                    result = await pbx.call(phone.spec.user)
                    pushed = inbox.first_call.get(phone.token or "")
                    done.wakes.append(
                        Wake(
                            mode,
                            result.status,
                            None if pushed is None else pushed - started,
                            result.wake_seconds if result.woken else None,
                        )
                    )
        finally:
            every = [p for group in phones.values() for p in group]
            await asyncio.gather(*(p.stop() for p in every), return_exceptions=True)
            await pbx.close()
            await inbox.close()


def _ms(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(ordered),
        "p50_ms": round(nearest_rank(ordered, 0.5) * 1000, 2),
        "p99_ms": round(nearest_rank(ordered, 0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def to_json(rounds: list[WakeRound], calls: int) -> dict[str, Any]:
    found: dict[str, Any] = {
        "method": "two serve processes (nodes A, B) on the run's Redis, SQLite each; the "
        "PBX on A; phones (mock iOS, TCP) on A (same node) or B (cross node), asleep; one "
        "call at a time, modes alternating; push = INVITE sent -> push on the pushing "
        "node's delivery feed in the bench; delivery = INVITE sent -> woken phone's 180 "
        "at the PBX",
        "calls_per_mode_per_round": calls,
        "errors": [r.error for r in rounds if r.error],
        "server_exit_status": [r.statuses for r in rounds],
    }
    for mode in MODES:
        wakes = [w for r in rounds for w in r.wakes if w.mode == mode]
        connected = [w for w in wakes if 200 <= w.status < 300]
        found[mode] = {
            "calls": len(wakes),
            "connected": len(connected),
            "failed_statuses": sorted({w.status for w in wakes if not 200 <= w.status < 300}),
            "invite_to_push": _ms([w.push_s for w in connected if w.push_s is not None]),
            "invite_to_delivery": _ms(
                [w.delivery_s for w in connected if w.delivery_s is not None]
            ),
        }
    return found


def print_report(found: dict[str, Any]) -> None:
    print("\nWake latency, one call at a time (ms, p50 / p99 / max over all rounds):")
    for mode in MODES:
        m = found[mode]
        push, delivery = m["invite_to_push"], m["invite_to_delivery"]
        print(
            f"  {mode:11} {m['connected']}/{m['calls']} connected   INVITE->push "
            f"{push['p50_ms']} / {push['p99_ms']} / {push['max_ms']}   INVITE->delivery "
            f"{delivery['p50_ms']} / {delivery['p99_ms']} / {delivery['max_ms']}"
        )
    for error in found["errors"]:
        print(f"  wake round error: {error}")
