"""The location service: which node holds what, in Redis, for the other nodes.

    location = Location(shared, secret)
    await location.link_pbx({serial: flow_id})       # this node holds the PBX's link
    await location.pbx(serial)                       # (node, flow id) or None
    await location.registered(binding, instance, flow_id, ttl)  # + PUBLISH
    await location.listen(on_registration)           # events; re-read on resubscribe

Keys (what the policy's `location` category declares; memory only, each with an
expiry, so an entry outlives neither what it describes nor the node holding it):

- `pbx:<serial>` -> `<node> <flow id>`: the node holding the PBX's link and the id of
  the flow there (a counter of that process, nothing of the connection). Set on every
  accepted link REGISTER and refreshed by its node every LINK_REFRESH seconds with an
  expiry of LINK_TTL, so a node's entries go at most a minute after it stops; deleted
  when the flow closes (only if it still names that flow: a PBX that linked again
  elsewhere meanwhile keeps its new entry). A dead node's entries are ignored at once
  when its heartbeat (`nodes:<node>`, cluster/redis.py) expires.
- `reg:<binding>` -> `<node> <flow id> <instance> <time>`: the latest accepted REGISTER
  of a binding with push parameters, by fingerprint only, and when it was accepted.
  The binding's fingerprint is a keyed hash (the cluster secret) of push service, push
  token, user and PBX serial; the instance's, of its `+sip.instance`: no user name,
  token or address is in Redis. Kept for the re-reads only: REREAD_WINDOW at most
  (a parked call waits less), never longer than the binding.
- channel `registrations`: the same, published on every such REGISTER, so that a node
  holding a parked INVITE for that binding releases it to the flow on `<node>`.

Phone flows have no key: every token names the node that made it (proxy/sip/tokens.py),
so the node of a phone's flow is read from the Path the PBX routes by.

Pub/sub drops what is published while a node is disconnected: after every (re)subscribe
a node re-reads `reg:` of each binding it has calls parked for (`reread`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import orjson

from cluster.redis import NODES_PREFIX, ClusterUnavailable, SharedRedis, node_key

log = logging.getLogger("softrelay.cluster")

REGISTRATIONS = "registrations"
PBX_PREFIX = "pbx:"
REG_PREFIX = "reg:"
# A PBX link's entry, refreshed by its node every LINK_REFRESH seconds (and again after
# Redis restarted empty), lives LINK_TTL: a dead node's entries go within a minute.
LINK_TTL = 60
LINK_REFRESH = 20.0
# A registration is kept this long for the re-reads after a resubscribe: longer than
# any call waits parked (the wake timeout, 30 s by default).
REREAD_WINDOW = 60

# A PBX's entry, if its node is this one or alive: one round trip per lookup (a lookup
# is on the path of every REGISTER and call for a PBX on another node). The heartbeat
# key it reads is not in KEYS: fine on one Redis server, which is what a cluster of
# softrelay nodes shares (not Redis Cluster, where keys must be declared).
_PBX = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
local node = string.match(value, '^(%S+) ')
if node ~= ARGV[1] and redis.call('EXISTS', ARGV[2] .. node) == 0 then return false end
return value
"""

# Deletes a PBX's entry only while it still names the flow that closed.
_UNLINK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Registration(NamedTuple):
    """An accepted REGISTER of a binding with push parameters, as another node saw it."""

    binding: str  # fingerprint
    instance: str  # fingerprint
    node: str
    flow_id: int
    at: float  # clock time of the node that saw it


class Fingerprints:
    """Keyed hashes of what names a binding (the cluster secret: the same on every node,
    and an entry cannot be traced back to a user or token without it)."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"softrelay location\0" + secret.encode()).digest()

    def _hash(self, *parts: str) -> str:
        data = "\0".join(parts).encode()
        return hmac.digest(self._key, data, "sha256")[:16].hex()

    def binding(self, service: str, token: str, user: str, serial: str) -> str:
        return self._hash("b", service, token, user, serial)

    def instance(self, instance: str) -> str:
        return self._hash("i", instance)


class Location:
    """This node's view of the location service (module docstring)."""

    def __init__(self, shared: SharedRedis, secret: str) -> None:
        self._shared = shared
        self.node_id = shared.node_id
        self.fingerprints = Fingerprints(secret)
        self._unlink = shared.script(_UNLINK)
        self._pbx = shared.script(_PBX)

    # --- PBX links -------------------------------------------------------------------

    async def link_pbx(self, links: dict[str, int]) -> None:
        """This node holds these PBX links (serial -> flow id): set, or refresh."""
        if not links:
            return
        client = self._shared.client
        async with self._shared.guard("pbx link"), client.pipeline(transaction=False) as pipe:
            for serial, flow_id in links.items():
                pipe.set(PBX_PREFIX + serial, f"{self.node_id} {flow_id}", ex=LINK_TTL)
            await pipe.execute()

    async def republish(self, links: dict[str, int]) -> None:
        """After a reconnect (Redis may have restarted empty): this node's heartbeat and
        the PBX links it holds, written again at once."""
        if self._shared.beating:
            await self._shared.beat()
        await self.link_pbx(links)

    async def unlink_pbx(self, serial: str, flow_id: int) -> None:
        await self._unlink("pbx unlink", [PBX_PREFIX + serial], [f"{self.node_id} {flow_id}"])

    async def pbx(self, serial: str) -> tuple[str, int] | None:
        """The node holding the PBX's link and its flow id there, if that node is alive."""
        # None also when its node died: the PBX will link again somewhere.
        raw = await self._pbx("pbx lookup", [PBX_PREFIX + serial], [self.node_id, NODES_PREFIX])
        if not isinstance(raw, bytes | str):
            return None
        node, _, flow_id = _text(raw).partition(" ")
        return (node, int(flow_id)) if flow_id.isdigit() else None

    async def live_nodes(self) -> list[str]:
        """The other nodes whose heartbeat has not expired."""
        return [node for node in await self._shared.live_nodes() if node != self.node_id]

    async def address(self, node: str) -> tuple[str, int] | None:
        """Where a live node's internal SIP link listens (its heartbeat's `internal`)."""
        async with self._shared.guard("node address"):
            raw = await self._shared.client.get(node_key(node))
        if raw is None:
            return None
        return parse_address(str(orjson.loads(raw).get("internal", "")))

    # --- registrations ---------------------------------------------------------------

    async def registered(
        self, binding: str, instance: str, flow_id: int, ttl: int, at: float
    ) -> None:
        """A binding registered on this node's flow: keep it (for the re-reads) and
        tell every node."""
        value = f"{self.node_id} {flow_id} {instance} {at!r}"
        client = self._shared.client
        async with self._shared.guard("registration"), client.pipeline(transaction=False) as pipe:
            pipe.set(REG_PREFIX + binding, value, ex=max(1, min(ttl, REREAD_WINDOW)))
            pipe.publish(REGISTRATIONS, f"{binding} {value}")
            await pipe.execute()

    async def registration(self, binding: str) -> Registration | None:
        async with self._shared.guard("registration lookup"):
            raw = await self._shared.client.get(REG_PREFIX + binding)
        return None if raw is None else _registration(binding + " " + _text(raw))

    async def listen(
        self,
        on_registration: Callable[[Registration], Awaitable[None]],
        reread: Callable[[], Awaitable[None]],
    ) -> None:
        """Registration events from every node (this one's included) from now on, and
        `reread` after every (re)subscribe."""

        async def handle(data: bytes) -> None:
            event = _registration(data.decode(errors="replace"))
            if event is not None:
                await on_registration(event)

        await self._shared.subscriptions.subscribe(REGISTRATIONS, handle, reread=reread)


def format_address(address: tuple[str, int]) -> str:
    """HOST:PORT, an IPv6 host in brackets (what `parse_address` reads)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int] | None:
    """A node's link address as a heartbeat or a handshake states it; None if not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def _registration(text: str) -> Registration | None:
    """A published or stored registration; None for anything else (a bad entry)."""
    parts = text.split(" ")
    if len(parts) != 5:
        return None
    binding, node, flow_id, instance, at = parts
    try:
        return Registration(binding, instance, node, int(flow_id), float(at))
    except ValueError:
        return None


__all__ = ["ClusterUnavailable", "Location", "Registration"]
