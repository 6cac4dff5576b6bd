"""Overload: shed new work with 503 before the relay falls behind on what it took on.

Past its capacity a relay that keeps accepting calls loses them all: datagrams wait in
the kernel, peers retransmit, and every retransmission costs as much as the original.
So when the event loop lags, new requests (an INVITE or REGISTER outside a dialog) are
answered `503 Service Unavailable` with `Retry-After` (RFC 3261 21.5.4): the answer
costs a fraction of a relayed call, and a phone or PBX retries elsewhere or later.
Responses and in-dialog requests are still routed: they finish calls already set up.

The signal is the loop's lag, measured by a probe that asks to wake every `PROBE`
seconds. It must be sustained: shedding starts after `late_probes` probes in a row woke
`lag` late, and stops after as many in a row under half of it. One late wake-up is a
scheduling hiccup (a CPU shared with other processes, a garbage collection, a large
write), not overload: shedding on it refused calls a node had the capacity for (the
100,000-phone bench, bench/README.md). A loop that is really behind is late at every
probe. The hysteresis keeps shedding from flapping from message to message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

PROBE = 0.05  # seconds between probes of the loop's lag


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    lag: float = 0.1  # seconds the loop may lag before new requests are refused; 0: never
    retry_after: int = 5  # seconds, in the 503's Retry-After
    late_probes: int = 3  # probes in a row past `lag` (or under half of it) to turn over


class Overload:
    def __init__(self, settings: OverloadSettings) -> None:
        self.settings = settings
        self.shedding = False
        self.lag = 0.0  # the last measured lag, seconds
        self._run = 0  # probes in a row that point the other way than `shedding`

    def observe(self, lag: float) -> None:
        """A lag measured by the probe: shedding turns on after `late_probes` in a row at
        the limit, off after as many in a row below half of it."""
        self.lag = lag
        limit = self.settings.lag
        if limit <= 0:
            return
        turning = lag < limit / 2 if self.shedding else lag >= limit
        if not turning:
            self._run = 0  # the run is broken
            return
        self._run += 1
        if self._run >= self.settings.late_probes:
            self.shedding = not self.shedding
            self._run = 0

    async def probe_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(PROBE)
            self.observe(max(0.0, loop.time() - asked - PROBE))
