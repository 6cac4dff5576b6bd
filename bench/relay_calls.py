"""Calls (INVITE/180/200/ACK/BYE/200) climbing rising rates on three paths, with SIPp
on both ends: the caller runs `bench/sipp/uac.xml`, the callee `bench/sipp/uas.xml`.

(1) direct: SIPp UAC -> SIPp UAS, the limit of the two SIPp processes on this machine.
(2) kamailio: UAC -> Kamailio -> UAS, from the shared peer configuration
    (../shared/peers/kamailio-relay.cfg) with this run's ports.
(3) softrelay: UAC -> `softrelay serve` -> UAS. The UAS is the static PBX of serial
    0077 and the UAC calls sip:service@0077.relay.test.

The goal: softrelay's best call rate is at least half of Kamailio's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.harness import HOST, Processes, Softrelay, free_port, process_tree, start_kamailio
from bench.relay_sipp import CALL_SERIAL, DOMAIN, UAC, Sipp, Step, best, climb

PATHS = ("direct", "kamailio", "softrelay")
LABELS = {
    "direct": "SIPp UAC -> SIPp UAS (limit)",
    "kamailio": "UAC -> Kamailio -> UAS",
    "softrelay": "UAC -> softrelay -> UAS",
}
TARGET_RATIO = 0.5  # the issue: at least half of Kamailio's call rate
KEYS = {"domain": f"{CALL_SERIAL}.{DOMAIN}"}  # the UAC calls sip:service@0077.relay.test


async def direct(sipp: Sipp, uas_port: int, rates: Sequence[int], refine: int) -> list[Step]:
    """(1) The UAC straight to the UAS: no relay, so no relay CPU either."""
    target = f"{HOST}:{uas_port}"
    return await climb(
        lambda rate: sipp.step(UAC, target, rate, KEYS, None), rates, refine, "direct", None
    )


async def through_kamailio(
    procs: Processes,
    sipp: Sipp,
    config: Path,
    work: Path,
    uas_port: int,
    rates: Sequence[int],
    refine: int,
) -> tuple[list[Step], int]:
    """(2) Through Kamailio from the peer `config`; its steps and its exit status."""
    port = free_port()
    kamailio = await start_kamailio(procs, config, work, port, uas_port)
    try:
        pids = process_tree(kamailio.pid)  # it forks its workers at start
        target = f"{HOST}:{port}"
        steps = await climb(
            lambda rate: sipp.step(UAC, target, rate, KEYS, pids), rates, refine, "kamailio", pids
        )
    finally:
        status = await procs.stop(kamailio)
    return steps, status


async def through_softrelay(
    sipp: Sipp,
    server: Softrelay,
    rates: Sequence[int],
    refine: int,
    *,
    name: str = "softrelay",
    pids: Sequence[int] | None = None,
) -> list[Step]:
    """(3) Through a running `softrelay serve` whose static PBX is the UAS; `pids` the
    relay's processes (default: the one `serve`; with --workers, every worker)."""
    target = f"{HOST}:{server.ports['udp']}"
    pids = [server.proc.pid] if pids is None else pids
    return await climb(
        lambda rate: sipp.step(UAC, target, rate, KEYS, pids), rates, refine, name, pids
    )


def ratio(paths: dict[str, list[Step]]) -> float | None:
    """softrelay's best rate over Kamailio's, when both ran and Kamailio passed a step."""
    kamailio, relay = best(paths.get("kamailio", [])), paths.get("softrelay")
    if kamailio is None or relay is None:
        return None
    mine = best(relay)
    return (mine.rate if mine else 0) / kamailio.rate
