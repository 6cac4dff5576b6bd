"""Where the scrubbing chains run: never on the event loop.

The loop reads the envelope's header lines; the event's JSON, as the client sent it, is
parsed and scrubbed in a worker (`crashreports.worker.answer`) while the loop goes on
answering SIP, pushes and the other routes, and comes back as the scrubbed event's JSON,
which the store encrypts as it is:

- "process" (the default): `workers` processes of `python -m crashreports.worker`,
  started at the first report (a server that gets none starts none), each given the
  pickled chains of every project once, compiling and warming them up itself. The event
  crosses as the JSON bytes the client sent, and comes back as JSON bytes: the loop's
  cost per event is a pipe write and a read of bytes (measured: ProcessPoolExecutor
  cost the loop's process ~260 µs of CPU per round trip, even for a no-op on bytes, in
  its manager and feeder threads).
- "thread": a pool of threads in this process. RE2 releases the GIL while it matches,
  but the walk over the event and the replacements are Python and hold it, so a
  scrubbing thread takes the GIL from the loop about as long as the chain runs, and a
  garbage collection of the whole server's heap can fall on a report's CPU budget.

Measured (bench/crashreports.py --mode ingest, `softrelay serve` on 2 shared cores,
gzip envelopes of the stock SDK): "process" 740 envelopes/s of ~8 KiB (620 of ~16 KiB)
with one worker, 914 (734) with two; "thread" 424 (394), its process spending 2.5 ms
of CPU per envelope against 1.9 ms for the loop and the worker together. /healthz
during a flood of envelopes: p99 ~2 ms either way. So "process" is the default.
Since the event is parsed only in the worker and the scrubber got faster (3 runs per
tree, interleaved, load 1.2-1.6): one worker 1,528-1,800 envelopes/s of ~8 KiB
(median 1,798; the tree before 1,032-1,123) and 897-1,091 of ~16 KiB (before
731-783); the serve process ~360-400 µs of CPU per envelope of ~8 KiB (before
~570-690), with its worker ~0.9-1.0 ms (before ~1.45-1.6). Two workers, in other runs:
1,684-1,906 (~8 KiB) and 1,212-1,373 (~16 KiB).

`Scrubbers` is created and closed by the crash reports' cleanup context
(`crashreports.service`); each worker's reader task is owned by its `_Process`, and
closing ends the workers' input, lets them answer what they hold, and awaits them.
A worker that died (killed, out of memory) fails the events it held with
`ScrubberUnavailable` (503, nothing stored) and is replaced at the next event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import sys
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from crashreports.scrubber import Chain
from crashreports.worker import answer, frame, warm_up

log = logging.getLogger("softrelay.crashreports")
START_TIMEOUT = 60.0  # seconds for a worker to import, compile and warm up its chains
STOP_TIMEOUT = 10.0  # seconds for a worker to finish what it holds once its input ends


class ScrubberUnavailable(Exception):
    """The worker holding an event died; the event was not scrubbed (and not kept)."""


class MalformedEvent(ValueError):
    """The event's JSON is not JSON, or not an object; the message says which."""


@dataclass(frozen=True, slots=True)
class Scrubbed:
    """What became of one event: kept as `event` (the scrubbed JSON), or dropped unstored
    for `dropped` (the counter label: no_opt_in, over_budget, scrub_error)."""

    event_id: str
    event: bytes | None
    dropped: str = ""


async def _read_frame(stream: asyncio.StreamReader) -> bytes | None:
    try:
        head = await stream.readexactly(4)
        return await stream.readexactly(int.from_bytes(head, "big"))
    except asyncio.IncompleteReadError:
        return None


class _Process:
    """One worker process and the events it holds, answered in the order sent."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.pending: deque[asyncio.Future[bytes]] = deque()
        self.dead = False
        self.reader = asyncio.create_task(self._read(), name="crash-scrub-reader")

    @classmethod
    async def start(cls, chains: bytes) -> _Process:
        # The worker imports what this process can: the same search path (as `spawn` would).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "crashreports.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(frame(chains))
            await proc.stdin.drain()
            async with asyncio.timeout(START_TIMEOUT):
                ready = await _read_frame(proc.stdout)
        except (OSError, TimeoutError):
            ready = None
        if ready != b"ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ScrubberUnavailable
        return cls(proc)

    async def _read(self) -> None:
        try:
            while (data := await _read_frame(self.stdout)) is not None:
                waiter = self.pending.popleft()
                if not waiter.done():  # its request may have been cancelled
                    waiter.set_result(data)
        finally:
            self.dead = True
            while self.pending:
                waiter = self.pending.popleft()
                if not waiter.done():
                    waiter.set_exception(ScrubberUnavailable())

    async def ask(self, request: bytes) -> bytes:
        if self.dead:
            raise ScrubberUnavailable
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending.append(waiter)
        try:
            self.stdin.write(frame(request))
            await self.stdin.drain()
        except (ConnectionError, RuntimeError):
            raise ScrubberUnavailable from None
        return await waiter

    async def close(self) -> None:
        """End its input; it answers what it holds and exits (killed if it does not)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        await self.reader


class Scrubbers:
    """The workers that run the chains of `chains` (project id -> chain)."""

    def __init__(self, chains: Mapping[str, Chain], mode: str, workers: int) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"unknown scrub mode {mode!r}")
        self.chains = dict(chains)
        self.mode = mode
        self.workers = workers
        self._threads: ThreadPoolExecutor | None = None
        self._processes: list[_Process] = []
        self._starting = asyncio.Lock()

    @classmethod
    async def create(cls, chains: Mapping[str, Chain], mode: str, workers: int) -> Scrubbers:
        """The pool; threads share the chains of this process, warmed up here once
        (off the loop); processes start at the first event and warm up their own."""
        scrubbers = cls(chains, mode, workers)
        if mode == "thread":
            threads = scrubbers._threads = ThreadPoolExecutor(
                workers, thread_name_prefix="crash-scrub"
            )
            loop = asyncio.get_running_loop()
            for chain in {id(c): c for c in scrubbers.chains.values()}.values():
                await loop.run_in_executor(threads, warm_up, chain)
        return scrubbers

    async def scrub(self, project: str, header_id: str, payload: bytes) -> Scrubbed:
        """The event JSON `payload` scrubbed by the chain of `project` (`header_id`: the
        envelope's event id, "" if none); MalformedEvent if it is no JSON object,
        ScrubberUnavailable if its worker died."""
        request = b"\x00".join((project.encode(), header_id.encode(), payload))
        if self._threads is not None:
            job = partial(answer, self.chains, request)
            reply = await asyncio.get_running_loop().run_in_executor(self._threads, job)
        else:
            worker = await self._worker()
            reply = await worker.ask(request)
        kind = reply[:1]
        if kind == b"!":
            raise MalformedEvent(reply[1:].decode())
        kept_id = reply[1:33].decode()
        if kind == b"+":
            return Scrubbed(kept_id, reply[33:])
        return Scrubbed(kept_id, None, reply[33:].decode())

    async def _worker(self) -> _Process:
        live = [p for p in self._processes if not p.dead]
        if len(live) < self.workers:
            async with self._starting:
                dead = [p for p in self._processes if p.dead]
                for process in dead:
                    log.warning("a crash scrubbing worker ended; starting another")
                    self._processes.remove(process)
                    await process.close()
                chains = pickle.dumps(self.chains)
                while len(self._processes) < self.workers:
                    self._processes.append(await _Process.start(chains))
                live = list(self._processes)
        return min(live, key=lambda p: len(p.pending))

    async def close(self) -> None:
        """Workers answer what they hold and stop; threads finish what they run."""
        async with self._starting:
            processes, self._processes = self._processes, []
        for process in processes:
            await process.close()
        if self._threads is not None:
            await asyncio.to_thread(self._threads.shutdown, wait=True, cancel_futures=True)


__all__ = ["MalformedEvent", "Scrubbed", "ScrubberUnavailable", "Scrubbers", "warm_up"]
