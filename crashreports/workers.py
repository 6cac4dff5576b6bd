"""Where the scrubbing chains run: never on the event loop.

A crash report is parsed on the loop (orjson, bounded by the body cap), then scrubbed
in a worker while the loop goes on answering SIP, pushes and the other routes:

- "process" (the default): a pool of `workers` processes (started by `spawn`, so no
  thread or lock of the server is copied into them), each holding the chains of every
  project, sent once when it starts and compiled there. An event crosses as a pickled
  dict both ways (~8 KiB: tens of µs).
- "thread": a pool of threads in this process. RE2 releases the GIL while it matches,
  but the walk over the event and the replacements are Python and hold it, so a
  scrubbing thread takes the GIL from the loop about as long as the chain runs.

Measured with bench/crashreports.py (SDK events of ~8 KiB, 2 cores): see the figures in
the module docstring of `crashreports.patterns` and bench/README.md.

`Scrubbers` is created and closed by the crash reports' cleanup context
(`crashreports.service`): closing cancels what has not started and waits for what
has. A pool whose worker died (killed, out of memory) is replaced once per failure;
the event it held is refused with 503, never stored unscrubbed.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import multiprocessing
from collections.abc import Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any

from crashreports.scrubber import Chain, DropEvent, Event, ScrubTree

log = logging.getLogger("softrelay.crashreports")

# The chains of a worker process, by project id: set once by `_install` at its start.
_CHAINS: dict[str, Chain] = {}


class ScrubberUnavailable(Exception):
    """The worker holding an event died; the event was not scrubbed (and not kept)."""


# Text of every shape the rules look for: scrubbed once per chain before the first event,
# so that RE2 builds the DFA states of common text then, not on a report's CPU budget
# (a cold chain took ~20 ms for its first SDK event, a warm one ~1.5 ms).
_WARM_UP: Event = {
    "message": "REGISTER sip:user@pbx.example.com from 192.0.2.1:5060 and [2001:db8::1]; "
    "mail user@example.com, call +49 151 23456789, 0151 98765432 or (555) 123-4567; "
    "card 4111 1111 1111 1111, iban DE89 3704 0044 0532 0130 00, mac 00:1a:2b:3c:4d:5e; "
    "https://u:p@host/x?token=abc&x=1 /home/user/x C:\\Users\\user\\x tel:+4930123456 "
    'Authorization: Digest username="u", response="0" password hunter2 "A B" <sip:u@h> '
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc Bearer abcdefghijk " + "ab" * 32,
    "extra": {"ha1": "0" * 32, "display_name": "A", "version": "2.4.1 at 12:30:45"},
    "breadcrumbs": {"values": [{"message": "tapped 7", "timestamp": "2026-03-01T12:00:00Z"}]},
}


def warm_up(chain: Chain) -> None:
    """Run the rules of `chain` (its `ScrubTree` steps, no other) over `_WARM_UP`."""
    for step in chain.steps:
        if isinstance(step, ScrubTree):
            step(copy.deepcopy(_WARM_UP))


def _install(chains: Mapping[str, Chain]) -> None:
    _CHAINS.clear()
    _CHAINS.update(chains)
    for chain in {id(c): c for c in chains.values()}.values():
        warm_up(chain)


def _scrub(project: str, event: Event) -> tuple[bool, Any]:
    """(True, the scrubbed event) or (False, the reason it was dropped)."""
    try:
        return True, _CHAINS[project](event)
    except DropEvent as exc:
        return False, exc.reason


def _scrub_with(chain: Chain, event: Event) -> tuple[bool, Any]:
    try:
        return True, chain(event)
    except DropEvent as exc:
        return False, exc.reason


class Scrubbers:
    """The pool that runs the chains of `chains` (project id -> chain)."""

    def __init__(self, chains: Mapping[str, Chain], mode: str, workers: int) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"unknown scrub mode {mode!r}")
        self.chains = dict(chains)
        self.mode = mode
        self.workers = workers
        self._executor = self._new_executor()

    @classmethod
    async def create(cls, chains: Mapping[str, Chain], mode: str, workers: int) -> Scrubbers:
        """The pool; threads share the chains of this process, warmed up here once
        (off the loop); processes warm up their own when they start."""
        scrubbers = cls(chains, mode, workers)
        if mode == "thread":
            loop = asyncio.get_running_loop()
            for chain in {id(c): c for c in scrubbers.chains.values()}.values():
                await loop.run_in_executor(scrubbers._executor, warm_up, chain)
        return scrubbers

    def _new_executor(self) -> Executor:
        if self.mode == "thread":
            return ThreadPoolExecutor(self.workers, thread_name_prefix="crash-scrub")
        # Workers start at the first event, not with the server: a server that gets no
        # crash report starts no process.
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_install,
            initargs=(self.chains,),
        )

    async def scrub(self, project: str, event: Event) -> Event:
        """`event` scrubbed by the chain of `project`; DropEvent if it must not be kept."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        if self.mode == "thread":
            job = partial(_scrub_with, self.chains[project], event)
        else:
            job = partial(_scrub, project, event)
        try:
            kept, result = await loop.run_in_executor(executor, job)
        except BrokenProcessPool:
            self._replace(executor)
            raise ScrubberUnavailable from None
        if not kept:
            raise DropEvent(result)
        scrubbed: Event = result
        return scrubbed

    def _replace(self, broken: Executor) -> None:
        if self._executor is broken:
            log.warning("scrubber process died; starting a new pool")
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()

    async def close(self) -> None:
        """Cancel what has not started, wait for what has (off the loop)."""
        executor = self._executor
        await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)


__all__ = ["ScrubberUnavailable", "Scrubbers"]
