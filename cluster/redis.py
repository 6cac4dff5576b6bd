"""The one owner of a node's Redis connections: commands, scripts, pub/sub, heartbeat.

    shared = await SharedRedis.create(settings)        # connects and PINGs, or raises
    async with shared.guard("rate limit"):             # any Redis error in here ...
        await shared.client.get(key)                   # ... is ClusterUnavailable
    take = shared.script(LUA)                          # EVALSHA, reloaded after a restart
    shared.subscriptions.subscribe(channel, on_message, reread=on_resubscribed)
    shared.start(heartbeat={"internal": "10.0.0.5:5090"})   # heartbeat + pub/sub tasks
    await shared.live_nodes()                          # {node id: its heartbeat fields}
    await shared.close()                               # tasks end, heartbeat key deleted

Errors (STYLE 5, 6): every failure of Redis (refused, reset, timed out, auth, a
script's error) becomes one `ClusterUnavailable` in `guard`, with the Redis target
(host:port/db, never the URL: it holds the password) and the class of what failed.
It is temporary: the caller refuses what depends on Redis (a limit that protects
fails closed, webapi/ratelimit.py) and tries again later. Nothing is retried inside
`guard` beyond redis-py's one reconnect of a stale pooled connection; every call is
bounded by `[cluster] timeout`, so nothing waits on Redis for longer.

Pub/sub (`Subscriptions`): Redis drops the messages published while a subscriber is
disconnected, and a subscriber cannot tell what it missed. So every channel has a
`reread`, run each time Redis confirms the channel's SUBSCRIBE, the first time and
after every reconnect: it reads again, from keys, the state the messages would have
told (the location service re-reads who holds what). Messages that arrive meanwhile
wait in the socket and are handled after it, in order; handlers are idempotent. The
subscriber connection has no retries of its own (redis-py would resubscribe silently
and no reread would run): on any error it is dropped and a new one is made after a
capped, jittered backoff. A quiet connection is PINGed every heartbeat interval; no
answer within the heartbeat expiry counts as lost.

Heartbeat: `nodes:<node id>` holds the node's fields (its internal SIP address...), set
with an expiry of `heartbeat_expiry` every `heartbeat_interval`. A node that dies stops
refreshing it and drops out of `live_nodes` when it expires; one that stops cleanly
deletes it at once. The key holds only the node's own addresses (policy: `location`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cluster.settings import ClusterSettings
from privacy.tasks import Tasks

log = logging.getLogger("softrelay.cluster")

NODES_PREFIX = "nodes:"
# Reconnecting the subscriber: from BACKOFF_FIRST doubling to BACKOFF_CAP, with jitter.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
_SCAN_COUNT = 500

MessageHandler = Callable[[bytes], Awaitable[None]]
Reread = Callable[[], Awaitable[None]]


class ClusterUnavailable(Exception):
    """Redis cannot be reached or did not answer in time: temporary, try again later.
    The message names the Redis target and what failed, never the URL."""


def node_key(node_id: str) -> str:
    return f"{NODES_PREFIX}{node_id}"


class Backoff:
    """Capped exponential backoff with full jitter (STYLE 10)."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def reset(self) -> None:
        self._next = self._first

    def delay(self) -> float:
        current = self._next
        self._next = min(self._cap, current * 2)
        return random.uniform(current / 2, current)  # noqa: S311 -- jitter, not a secret


@dataclass(slots=True)
class _Channel:
    handler: MessageHandler
    reread: Reread | None


class SharedRedis:
    """A node's connections to Redis; see the module docstring."""

    def __init__(self, settings: ClusterSettings, client: Redis, subscriber: Redis) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.client = client
        self._tasks = Tasks(log, "cluster.task_failed")
        self.subscriptions = Subscriptions(self, subscriber)
        self._heartbeat: dict[str, str] | None = None
        self._live: Callable[[], Mapping[str, str]] | None = None

    @classmethod
    async def create(cls, settings: ClusterSettings) -> SharedRedis:
        """Connect and PING; ClusterUnavailable when Redis does not answer."""
        # No socket_timeout: with one, redis-py sends every command inside
        # `asyncio.wait_for`, which on Python 3.11 loses a cancellation that arrives as
        # the write completes (CPython gh-86296, fixed in 3.12): a heartbeat cancelled at
        # shutdown beat on, and `close` waited for it forever. `guard` (asyncio.timeout)
        # bounds every call instead; the subscriber bounds its own.
        # One retry: a pooled connection Redis closed (a restart) reconnects once.
        client = Redis.from_url(
            settings.redis_url,
            retry=Retry(NoBackoff(), 1),
            socket_connect_timeout=settings.timeout,
        )
        # No retries: this connection's losses must surface, so rereads run (docstring).
        subscriber = Redis.from_url(
            settings.redis_url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=settings.timeout,
        )
        shared = cls(settings, client, subscriber)
        try:
            async with shared.guard("PING at start"):
                await client.ping()
        except ClusterUnavailable:
            await shared.close()
            raise
        return shared

    @contextlib.asynccontextmanager
    async def guard(self, what: str) -> AsyncIterator[None]:
        """Bound the calls inside by `timeout`; turn Redis's failures into
        ClusterUnavailable (the one place they are translated). A cancellation of the
        caller stays one, whatever the client library made of it."""
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.settings.timeout):
                yield
        except TimeoutError as exc:
            raise ClusterUnavailable(
                f"Redis at {self.settings.redis_target}: no answer to {what} "
                f"within {self.settings.timeout:g} s"
            ) from exc
        except (RedisError, OSError) as exc:
            if task is not None and task.cancelling() > cancelling:
                # redis-py turns a cancellation mid-read into a ConnectionError: it is
                # still a cancellation, and must end the task (STYLE 7).
                raise asyncio.CancelledError from exc
            raise ClusterUnavailable(
                f"Redis at {self.settings.redis_target}: {what} failed ({type(exc).__name__})"
            ) from exc
        if task is not None and task.cancelling() > cancelling:
            # Cancelled in here, and the call still returned: something below swallowed
            # the CancelledError. Raise it again, or the task runs on uncancellable.
            raise asyncio.CancelledError

    def script(self, lua: str) -> Script:
        return Script(self, lua)

    # --- background tasks ------------------------------------------------------------

    def start(
        self,
        heartbeat: Mapping[str, str] | None = None,
        live: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """Start the subscriber and, given the node's fields, the heartbeat; `live` adds
        fields read at each beat (the node's load, for the operator console)."""
        self._live = live
        self._tasks.spawn(self.subscriptions.run(), name="cluster-subscriber")
        if heartbeat is not None:
            self._heartbeat = dict(heartbeat)
            self._tasks.spawn(self._beat_forever(), name="cluster-heartbeat")

    async def close(self) -> None:
        """End the tasks, delete this node's heartbeat key (a clean stop leaves at once),
        close the connections. Idempotent."""
        await self._tasks.close()
        if self._heartbeat is not None:
            self._heartbeat = None
            try:
                async with self.guard("heartbeat delete"):
                    await self.client.delete(node_key(self.node_id))
            except ClusterUnavailable as exc:
                # It expires by itself; the others see the node gone a little later.
                log.warning(
                    "cluster.heartbeat_delete_failed", extra={"fields": {"error": str(exc)}}
                )
        await self.subscriptions.close()
        await self.subscriptions.client.aclose()
        await self.client.aclose()

    # --- heartbeat -------------------------------------------------------------------

    @property
    def beating(self) -> bool:
        """Whether the heartbeat runs (`start` was given the node's fields)."""
        return self._heartbeat is not None

    async def beat(self) -> None:
        """Set this node's key with its expiry once; ClusterUnavailable if Redis fails."""
        fields = self._heartbeat or {}
        if self._live is not None:
            fields = {**fields, **self._live()}
        value = orjson.dumps({"node": self.node_id, **fields})
        expiry_ms = max(1, round(self.settings.heartbeat_expiry * 1000))
        async with self.guard("heartbeat"):
            await self.client.set(node_key(self.node_id), value, px=expiry_ms)

    async def _beat_forever(self) -> None:
        failing = False
        while True:
            try:
                await self.beat()
                if failing:
                    log.info("cluster.heartbeat_resumed")
                failing = False
            except ClusterUnavailable as exc:
                if not failing:  # one line per outage, not one per beat
                    log.warning("cluster.heartbeat_failed", extra={"fields": {"error": str(exc)}})
                failing = True
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def live_nodes(self) -> dict[str, dict[str, str]]:
        """The nodes whose heartbeat has not expired: node id -> its fields."""
        async with self.guard("live nodes"):
            keys = [key async for key in self.client.scan_iter(f"{NODES_PREFIX}*", _SCAN_COUNT)]
            values = await self.client.mget(keys) if keys else []
        nodes: dict[str, dict[str, str]] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:  # expired between SCAN and MGET
                continue
            fields = orjson.loads(raw)
            nodes[bytes(key).decode().removeprefix(NODES_PREFIX)] = {
                str(k): str(v) for k, v in fields.items()
            }
        return nodes


class Script:
    """A Lua script run atomically by Redis (EVALSHA; loaded again when a restarted
    Redis no longer knows it), its errors translated by `guard`."""

    def __init__(self, shared: SharedRedis, lua: str) -> None:
        self._shared = shared
        self._script = shared.client.register_script(lua)

    async def __call__(self, what: str, keys: list[str], args: list[str | float | int]) -> object:
        async with self._shared.guard(what):
            return await self._script(keys=keys, args=args)


@dataclass(slots=True)
class _State:
    channels: dict[str, _Channel] = field(default_factory=dict)
    pubsub: PubSub | None = None
    # How many times every channel was (re)subscribed and reread: tests wait on it.
    rounds: int = 0


class Subscriptions:
    """Channels this node listens to, each with its reread (module docstring)."""

    def __init__(self, shared: SharedRedis, client: Redis) -> None:
        self._shared = shared
        self.client = client
        self._state = _State()
        self._changed = asyncio.Condition()

    @property
    def rounds(self) -> int:
        """Completed subscribe rounds (every channel confirmed, every reread run)."""
        return self._state.rounds

    async def wait_rounds(self, count: int) -> None:
        """Until at least `count` subscribe rounds have completed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._state.rounds >= count)

    async def subscribe(
        self, channel: str, handler: MessageHandler, *, reread: Reread | None = None
    ) -> None:
        """Listen to `channel` from now on and after every reconnect; `reread` runs
        after each confirmation of its SUBSCRIBE (the first included)."""
        async with self._changed:
            self._state.channels[channel] = _Channel(handler, reread)
            self._changed.notify_all()
        pubsub = self._state.pubsub
        if pubsub is not None:
            # Connected: subscribe on the live connection; if that fails the reader
            # sees the same failure and subscribes everything again on its next one.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._shared.settings.timeout):
                    await pubsub.subscribe(channel)

    async def close(self) -> None:
        pubsub, self._state.pubsub = self._state.pubsub, None
        if pubsub is not None:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py untyped

    async def run(self) -> None:
        """Subscribe, reread, handle messages; on any failure start again (backoff)."""
        backoff = Backoff()
        while True:
            try:
                await self._connected(backoff)
            # Redis lost or silent, or a reread that could not read (ClusterUnavailable,
            # or a bug): all the same here, as a new connection rereads everything.
            except Exception as exc:
                log.warning(
                    "cluster.subscriber_lost",
                    extra={
                        "fields": {
                            "redis": self._shared.settings.redis_target,
                            "error": type(exc).__name__,
                        }
                    },
                )
            finally:
                await self.close()
            await asyncio.sleep(backoff.delay())

    async def _connected(self, backoff: Backoff) -> None:
        settings = self._shared.settings
        # No channel yet: no connection to keep either (one is made for the first).
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._state.channels))
        pubsub = self.client.pubsub()
        self._state.pubsub = pubsub
        # Channels subscribed on this connection whose confirmation is still to come.
        pending = set(self._state.channels)
        async with asyncio.timeout(settings.timeout):
            await pubsub.subscribe(*pending)
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        round_done = False
        while True:
            message = await pubsub.get_message(timeout=settings.heartbeat_interval)
            now = loop.time()
            if message is None:
                if now - heard >= settings.heartbeat_expiry:
                    raise TimeoutError("no answer from Redis on the subscriber connection")
                if not pinged:
                    async with asyncio.timeout(settings.timeout):
                        await pubsub.ping()
                    pinged = True
                continue
            heard, pinged = now, False
            kind = message["type"]
            channel = _text(message.get("channel"))
            if kind == "subscribe":
                entry = self._state.channels.get(channel)
                if entry is not None and entry.reread is not None:
                    await entry.reread()
                pending.discard(channel)
                if not round_done and not pending:
                    round_done = True
                    # Only a round that reread everything resets it: a reread that keeps
                    # failing (Redis answers SUBSCRIBE, not writes) backs off too.
                    backoff.reset()
                    await self._round_complete()
            elif kind == "message":
                entry = self._state.channels.get(channel)
                if entry is not None:
                    await self._handle(entry, message["data"])

    async def _handle(self, entry: _Channel, data: object) -> None:
        if not isinstance(data, bytes):
            return
        try:
            await entry.handler(data)
        except Exception as exc:  # one bad message must not stop the subscriber
            # The class only (TRY400: no traceback): an exception may quote the message.
            log.error(  # noqa: TRY400
                "cluster.message_failed", extra={"fields": {"error": type(exc).__name__}}
            )

    async def _round_complete(self) -> None:
        async with self._changed:
            self._state.rounds += 1
            self._changed.notify_all()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""
