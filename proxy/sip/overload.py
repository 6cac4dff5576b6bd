"""Overload: shed new work with 503 before the relay falls behind on what it took on.

Past its capacity a relay that keeps accepting calls loses them all: datagrams wait in
the kernel, peers retransmit, and every retransmission costs as much as the original.
So when the event loop lags, new requests (an INVITE or REGISTER outside a dialog) are
answered `503 Service Unavailable` with `Retry-After` (RFC 3261 21.5.4): the answer
costs a fraction of a relayed call, and a phone or PBX retries elsewhere or later.
Responses and in-dialog requests are still routed: they finish calls already set up.

The signal is the loop's lag, measured by a probe that asks to wake every `PROBE`
seconds; with a hysteresis, so that shedding does not flap from message to message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

PROBE = 0.05  # seconds between probes of the loop's lag


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    lag: float = 0.1  # seconds the loop may lag before new requests are refused; 0: never
    retry_after: int = 5  # seconds, in the 503's Retry-After


class Overload:
    def __init__(self, settings: OverloadSettings) -> None:
        self.settings = settings
        self.shedding = False
        self.lag = 0.0  # the last measured lag, seconds

    def observe(self, lag: float) -> None:
        """A lag measured by the probe: turns shedding on at the limit, off below half."""
        self.lag = lag
        limit = self.settings.lag
        if limit <= 0:
            return
        if lag >= limit:
            self.shedding = True
        elif lag < limit / 2:
            self.shedding = False

    async def probe_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(PROBE)
            self.observe(max(0.0, loop.time() - asked - PROBE))
