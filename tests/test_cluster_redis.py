"""What the nodes of a cluster share through a real Redis (tests/redisserver.py): one
allowance for two limiters, the heartbeat's expiry and its clean stop, cancellation of a
task mid-command, the subscriber's reread after Redis restarts, failures translated into
ClusterUnavailable, and `[cluster]` parsing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from cluster.location import Location
from cluster.redis import ClusterUnavailable, SharedRedis, node_key
from cluster.settings import ClusterSettings, parse_cluster
from privacy.clock import ManualClock
from tests.limits import LONGEST_WAIT
from tests.redisserver import RedisServer
from tomlsections.reader import ConfigError, load_toml
from webapi.ratelimit import RateLimit, SharedLimiters

SECRET = "s" * 24

Open = Callable[..., Awaitable[SharedRedis]]


def settings(url: str, node_id: str = "node-a", **changes: float) -> ClusterSettings:
    base = ClusterSettings(
        redis_url=url, secret=SECRET, node_id=node_id, heartbeat_interval=0.05,
        heartbeat_expiry=0.3, timeout=2.0,
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]  # float fields only


@pytest.fixture
async def open_shared(redis_url: str) -> AsyncIterator[Open]:
    """Opens SharedRedis nodes on the test's Redis; all closed after the test."""
    opened: list[SharedRedis] = []

    async def factory(node_id: str = "node-a", **changes: float) -> SharedRedis:
        opened.append(await SharedRedis.create(settings(redis_url, node_id, **changes)))
        return opened[-1]

    yield factory
    for shared in opened:
        await shared.close()


async def test_two_nodes_limiters_share_one_allowance_exactly(
    open_shared: Open, clock: ManualClock
) -> None:
    """Three at once, one a second: node A and node B together get three, not six; a
    second later exactly one more between them; the wait is the bucket's, on both."""
    limit = RateLimit(per_minute=60, burst=3)
    a = SharedLimiters(clock, await open_shared("node-a"))("web", limit)
    b = SharedLimiters(clock, await open_shared("node-b"))("web", limit)
    assert [await a.check("198.51.100.7"), await b.check("198.51.100.7")] == [0.0, 0.0]
    assert await a.check("198.51.100.7") == 0.0
    assert await b.check("198.51.100.7") == pytest.approx(1.0)
    assert await a.wait("198.51.100.7") == pytest.approx(1.0)
    # Another client has its own bucket.
    assert await b.check("198.51.100.8") == 0.0
    clock.advance(0.5)
    assert await a.check("198.51.100.7") == pytest.approx(0.5)
    clock.advance(0.5)
    assert await b.check("198.51.100.7") == 0.0
    assert await a.check("198.51.100.7") == pytest.approx(1.0)


async def test_a_cost_is_taken_from_the_shared_bucket_at_once_or_not_at_all(
    open_shared: Open, clock: ManualClock
) -> None:
    limit = RateLimit(per_minute=60, burst=10)
    a = SharedLimiters(clock, await open_shared("node-a"))("batch", limit)
    b = SharedLimiters(clock, await open_shared("node-b"))("batch", limit)
    assert await a.take("all", cost=7) == 0.0
    assert await b.take("all", cost=4) == pytest.approx(1.0), "3 left on every node"
    assert await b.take("all", cost=3) == 0.0, "the refused take took nothing"
    assert await a.take("all") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot be taken"):
        await a.take("all", cost=11)


async def test_shared_buckets_hold_no_address(
    open_shared: Open, clock: ManualClock, redis_url: str
) -> None:
    limiter = SharedLimiters(clock, await open_shared())("w", RateLimit(per_minute=60, burst=2))
    await limiter.check("203.0.113.77")
    raw = Redis.from_url(redis_url)
    try:
        keys = [k for k in await raw.keys("*") if isinstance(k, bytes)]
        assert keys == [limiter.bucket("203.0.113.77").encode()]
        assert b"203.0.113" not in b"".join(keys)
        ttl = await raw.pttl(keys[0])
        assert 0 < ttl <= 61_000  # refilled in 1 s; kept a minute beyond (the policy's words)
    finally:
        await raw.aclose()


async def test_redis_down_is_cluster_unavailable_not_a_hang(
    open_shared: Open, clock: ManualClock, redis_server: RedisServer
) -> None:
    limiter = SharedLimiters(clock, await open_shared())("w", RateLimit(per_minute=60, burst=2))
    redis_server.stop()
    try:
        with pytest.raises(ClusterUnavailable) as caught:
            await limiter.check("198.51.100.7")
        assert redis_server.password not in str(caught.value)
        assert f"127.0.0.1:{redis_server.port}/0" in str(caught.value)
    finally:
        redis_server.start()
    # Back: the same limiter works again (the stale pooled connection is replaced).
    assert await limiter.check("198.51.100.7") == 0.0


async def test_subscriber_rereads_after_redis_restarts(
    open_shared: Open, redis_server: RedisServer
) -> None:
    """Pub/sub drops what is published while a subscriber is away: after Redis comes
    back, the channel is subscribed again and its reread runs; messages flow again."""
    shared = await open_shared()
    received: asyncio.Queue[bytes] = asyncio.Queue()
    rereads: list[int] = []

    async def on_message(data: bytes) -> None:
        await received.put(data)

    async def reread() -> None:
        rereads.append(shared.subscriptions.rounds)

    await shared.subscriptions.subscribe("registrations", on_message, reread=reread)
    shared.start()
    async with asyncio.timeout(LONGEST_WAIT):
        await shared.subscriptions.wait_rounds(1)
        assert rereads == [0]
        await shared.client.publish("registrations", b"first")
        assert await received.get() == b"first"
        redis_server.restart()
        await shared.subscriptions.wait_rounds(2)
        assert rereads == [0, 1]
        await shared.client.publish("registrations", b"second")
        assert await received.get() == b"second"


@contextlib.asynccontextmanager
async def key_events(redis_url: str, event: str) -> AsyncIterator[asyncio.Queue[bytes]]:
    """The keys Redis reports `event` for (keyspace notifications), as they happen."""
    raw = Redis.from_url(redis_url)
    await raw.config_set("notify-keyspace-events", "Eg$x")
    pubsub = raw.pubsub()
    await pubsub.subscribe(f"__keyevent@0__:{event}")
    keys: asyncio.Queue[bytes] = asyncio.Queue()

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                await keys.put(message["data"])

    reader = asyncio.create_task(read())
    try:
        yield keys
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py untyped
        await raw.aclose()


async def next_key(keys: asyncio.Queue[bytes], wanted: bytes) -> None:
    async with asyncio.timeout(LONGEST_WAIT):
        while await keys.get() != wanted:
            pass


async def test_a_node_that_stops_refreshing_drops_out_when_its_heartbeat_expires(
    open_shared: Open, redis_url: str
) -> None:
    """A node that beat and then died (no clean stop, no refresh): its key carries the
    heartbeat expiry, the others see it live until Redis expires it, then not."""
    dead = await open_shared("node-a")
    other = await open_shared("node-b")
    async with key_events(redis_url, "expired") as expired:
        await dead.beat()
        assert set(await other.live_nodes()) == {"node-a"}
        ttl = await other.client.pttl(node_key("node-a"))
        assert 0 < ttl <= 300  # heartbeat_expiry 0.3 s
        await next_key(expired, node_key("node-a").encode())
    assert await other.live_nodes() == {}


async def test_a_clean_stop_deletes_the_heartbeat_at_once(
    open_shared: Open, redis_url: str
) -> None:
    """The heartbeat task beats until close; close ends it (it was once left beating on,
    and close waited forever) and deletes the key: no wait for the expiry."""
    node = await open_shared("node-a")
    other = await open_shared("node-b")
    async with key_events(redis_url, "set") as sets:
        node.start(heartbeat={"internal": "127.0.0.1:5090"})
        await next_key(sets, node_key("node-a").encode())
        await next_key(sets, node_key("node-a").encode())  # and again: it refreshes
    live = await other.live_nodes()
    assert live == {"node-a": {"node": "node-a", "internal": "127.0.0.1:5090"}}
    async with asyncio.timeout(LONGEST_WAIT):
        await node.close()
    assert await other.live_nodes() == {}
    assert await other.client.exists(node_key("node-a")) == 0


async def test_live_heartbeat_fields_are_read_at_each_beat(
    open_shared: Open, redis_url: str
) -> None:
    """The console's cluster page shows other nodes' flows and load: each beat carries
    what `live` says then, beside the fixed fields. The beat task's first beat is waited
    for (the next is a minute away), so the explicit beat below is the only writer."""
    node = await open_shared("node-a", heartbeat_interval=60.0, heartbeat_expiry=120.0)
    other = await open_shared("node-b")
    load = {"flows": "3", "load": "1.5"}
    async with key_events(redis_url, "set") as sets:
        node.start(heartbeat={"internal": "127.0.0.1:5090"}, live=lambda: dict(load))
        await next_key(sets, node_key("node-a").encode())
    assert (await other.live_nodes())["node-a"] == {
        "node": "node-a",
        "internal": "127.0.0.1:5090",
        "flows": "3",
        "load": "1.5",
    }
    load["flows"] = "7"
    await node.beat()
    assert (await other.live_nodes())["node-a"]["flows"] == "7"
    await node.close()


async def test_a_task_cancelled_mid_command_ends(open_shared: Open) -> None:
    """Cancelled at each step of a Redis round trip, a task in `guard` always ends with
    CancelledError, never returns as if nothing happened (Python 3.11's wait_for, which
    redis-py used to send with, swallowed cancellations that met the write's end)."""
    shared = await open_shared()

    async def forever() -> None:
        while True:
            async with shared.guard("test set"):
                await shared.client.set("k", b"v")

    for steps in range(40):
        task = asyncio.create_task(forever())
        for _ in range(steps):
            await asyncio.sleep(0)  # step the loop: the cancel lands at another point
        task.cancel()
        async with asyncio.timeout(LONGEST_WAIT):
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_create_refuses_an_unreachable_redis(redis_server: RedisServer) -> None:
    url = redis_server.url().replace(redis_server.password, "wrong-password")
    with pytest.raises(ClusterUnavailable) as caught:
        await SharedRedis.create(settings(url))
    assert "wrong-password" not in str(caught.value)


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ('redis = "redis://:pw@host/0"\n', "cluster.redis", "'env:NAME' or 'file:PATH'"),
        ('redis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\nnode_id = "a b"\n',
         "cluster.node_id", "letters, digits"),
        ('redis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\n'
         'heartbeat_interval = "5s"\nheartbeat_expiry = "6s"\n',
         "cluster.heartbeat_expiry", "twice"),
        ('redis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\n'
         'heartbeat_expiry = "2m"\n', "cluster.heartbeat_expiry", "at most 1m"),
        ('redis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\nport = 1\n',
         "cluster.port", "unknown key"),
        ('redis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\ninternal_listen = ""\n',
         "cluster.internal_listen", "expected IP:PORT"),
        ('redis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\n'
         'internal_listen = "node-b:5090"\n', "cluster.internal_listen", "expected IP:PORT"),
    ],
)  # fmt: skip
def test_cluster_section_errors_name_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, key: str, message: str
) -> None:
    monkeypatch.setenv("SR_TEST_REDIS", "redis://:hunter2hunter2@10.0.0.9:6380/2")
    monkeypatch.setenv("SR_TEST_SECRET", SECRET)
    path = tmp_path / "softrelay.toml"
    path.write_text("[cluster]\n" + body)
    with pytest.raises(ConfigError) as caught:
        parse_cluster(load_toml(path).section("cluster"))
    assert (caught.value.file, caught.value.key) == (str(path), key)
    assert message in caught.value.message
    assert "hunter2" not in str(caught.value)


def test_cluster_section_parsed_and_the_url_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SR_TEST_REDIS", "redis://:hunter2hunter2@10.0.0.9:6380/2")
    monkeypatch.setenv("SR_TEST_SECRET", SECRET)
    path = tmp_path / "softrelay.toml"
    path.write_text(
        '[cluster]\nredis = "env:SR_TEST_REDIS"\nsecret = "env:SR_TEST_SECRET"\n'
        'node_id = "edge-1"\ninternal_listen = "10.0.0.5:5090"\n'
    )
    parsed = parse_cluster(load_toml(path).section("cluster"))
    assert parsed.node_id == "edge-1"
    assert parsed.internal_listen == ("10.0.0.5", 5090)
    assert (parsed.heartbeat_interval, parsed.heartbeat_expiry) == (2.0, 6.0)
    assert parsed.redis_target == "10.0.0.9:6380/2"
    assert "hunter2" not in repr(parsed)
    assert SECRET not in repr(parsed)


async def test_a_pbx_lookup_names_its_node_only_while_that_node_beats(open_shared: Open) -> None:
    """`Location.pbx` (one Lua round trip): its own entry always; another node's only
    while that node's heartbeat key exists; a value that is not `<node> <flow id>`,
    never. A node that died leaves its entry until it expires: ignored meanwhile."""
    a, b = await open_shared("node-a"), await open_shared("node-b")
    at_a, at_b = Location(a, SECRET), Location(b, SECRET)
    await at_a.link_pbx({"0042": 7})
    assert await at_a.pbx("0042") == ("node-a", 7), "its own, no heartbeat needed"
    assert await at_b.pbx("0042") is None, "node-a has no heartbeat yet"
    await a.beat()
    assert await at_b.pbx("0042") == ("node-a", 7)
    await b.client.delete(node_key("node-a"))  # as when its heartbeat expires
    assert await at_b.pbx("0042") is None
    assert await at_b.pbx("0043") is None, "never linked"
    await b.client.set("pbx:0044", "node-b not-a-flow")
    assert await at_b.pbx("0044") is None
