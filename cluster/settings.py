"""`[cluster]`: whether this process is a node of a cluster, and how it reaches the others.

Absent, softrelay is the single process it always was: nothing is shared, no Redis is
opened. Present, the node keeps what the nodes must share in Redis (cluster/redis.py):
the location service, rate limits, DSR challenges and failure counts, its heartbeat.

    [cluster]
    redis = "env:SOFTRELAY_REDIS_URL"    # redis://:password@host:6379/0 (or rediss://)
    secret = "file:/etc/softrelay/cluster.secret"   # the internal SIP link's secret
    node_id = ""                         # "" = <hostname>-<pid>
    internal_listen = "127.0.0.1:0"      # the internal SIP link between nodes
    heartbeat_interval = "2s"
    heartbeat_expiry = "6s"
    timeout = "2s"                       # the longest one Redis call may take

The Redis URL carries a password, so it is named by `env:`/`file:` only, like `[store]
dsn`, and read when a command opens the cluster (tomlsections.reader.Deferred). It is
never printed: messages name `redis_target` (host:port/db).
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field

from tomlsections.reader import Section

# A node id names Redis keys and SIP URIs (Path, Record-Route): a plain token.
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MIN_SECRET = 16
MAX_EXPIRY = 60  # seconds; config/policy/*.toml, category location
_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """A node's cluster settings; the Redis URL and the secret are the secrets
    themselves (read from their sources), kept out of repr."""

    redis_url: str = field(repr=False)
    secret: str = field(repr=False)
    node_id: str
    internal_listen: tuple[str, int] = ("127.0.0.1", 0)
    heartbeat_interval: float = 2.0
    heartbeat_expiry: float = 6.0
    timeout: float = 2.0  # one Redis call, connecting included
    source: str = ""  # the configuration file, for messages

    @property
    def redis_target(self) -> str:
        """host:port/db of the Redis URL, for messages (never its password)."""
        return redis_target(self.redis_url)


def default_node_id() -> str:
    """<hostname>-<pid>: unique among the workers of a host and across hosts."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40].strip(".-") or "node"
    return f"{host}-{os.getpid()}"


def redis_target(url: str) -> str:
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or 6379
    except ValueError:
        return "(an unreadable Redis URL)"
    if parsed.scheme == "unix":
        return f"unix:{parsed.path}"
    return f"{parsed.hostname or 'localhost'}:{port}{parsed.path or '/0'}"


def parse_cluster(sec: Section) -> ClusterSettings:
    """The `[cluster]` section; reads the Redis URL and the secret from their sources now."""
    url = sec.secret("redis")
    if not url:
        raise sec.error("redis", "is empty: name the Redis URL as 'env:NAME' or 'file:PATH'")
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise sec.error("redis", "is not a URL (redis://:password@host:port/db)") from None
    if parsed.scheme not in _SCHEMES:
        # The URL itself is not quoted: it holds the password.
        raise sec.error("redis", f"must be a {', '.join(_SCHEMES)} URL")
    secret = sec.secret("secret")
    if len(secret) < MIN_SECRET:
        raise sec.error("secret", f"the cluster secret must be at least {MIN_SECRET} characters")
    node_id = sec.text("node_id", "") or default_node_id()
    if not NODE_ID.fullmatch(node_id):
        raise sec.error(
            "node_id", f"expected letters, digits, '.', '_' or '-' (at most 63), got {node_id!r}"
        )
    internal = sec.address("internal_listen", "127.0.0.1:0")
    if internal is None:
        raise sec.error("internal_listen", "expected IP:PORT, got ''")
    interval = sec.duration("heartbeat_interval", "2s")
    expiry = sec.duration("heartbeat_expiry", "6s")
    if interval < 1:
        raise sec.error("heartbeat_interval", "must be at least 1s")
    if expiry < 2 * interval:
        raise sec.error(
            "heartbeat_expiry", "must be at least twice heartbeat_interval (one lost beat)"
        )
    if expiry > MAX_EXPIRY:
        # The policy's notice promises a stopped node's entries go within a minute.
        raise sec.error("heartbeat_expiry", "must be at most 1m (the privacy notice says so)")
    timeout = sec.duration("timeout", "2s")
    if timeout < 1:
        raise sec.error("timeout", "must be at least 1s")
    sec.finish()
    return ClusterSettings(
        redis_url=url,
        secret=secret,
        node_id=node_id,
        internal_listen=internal,
        heartbeat_interval=float(interval),
        heartbeat_expiry=float(expiry),
        timeout=float(timeout),
        source=str(sec.file),
    )


def check_cluster_sources(sec: Section) -> None:
    """At load: the secret keys name a source (`env:`/`file:`), read later."""
    sec.secret_source("redis", "")
    sec.secret_source("secret", "")
