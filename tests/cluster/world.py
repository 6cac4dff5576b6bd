"""Nodes of a cluster in this process: `serve`'s app (build_app) with real SIP
transports on loopback, each with its own store (SQLite under its own directory), the
same [cluster] Redis and secret, and its own internal link; the PBX of tests/peers.py
and the TCP phone of tests/sip/test_wake_e2e.py connect to them as to `serve`.

Every wait is bounded (STEP_TIMEOUT); nothing sleeps to let things happen.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from cluster.settings import ClusterSettings
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.sip.flow import Transport
from proxy.sip.nodes import Nodes
from proxy.sip.overload import OverloadSettings
from proxy.sip.relay import Relay
from proxy.sip.service import SIP_SERVICE
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import CLUSTER, RELAY, SIP_TRANSPORTS, Services, build_app
from tests.peers import DOMAIN, SERIAL

PBX_SECRET = "cluster-pbx-secret"
APP_ID = "com.example.softphone"  # the app of tests/sip/test_wake_e2e.py's PN_PARAM


@dataclass
class Node:
    name: str
    server: TestServer
    relay: Relay
    nodes: Nodes
    sip_port: int  # TCP and UDP

    async def rounds(self, count: int) -> None:
        """Until its registration events subscription has completed `count` rounds."""
        shared = self.server.app[CLUSTER]
        await asyncio.wait_for(shared.subscriptions.wait_rounds(count), 10)


StartNode = Callable[..., Awaitable[Node]]  # (name, heartbeat_interval, **Services changes)


@pytest.fixture
def cluster_secret() -> str:
    return secrets.token_hex(16)


@pytest.fixture
async def start_node(
    tmp_path: Path, redis_url: str, clock: ManualClock, cluster_secret: str
) -> AsyncIterator[StartNode]:
    """Starts node `name` of one cluster; all are closed after the test."""
    started: list[TestServer] = []

    async def start(name: str, heartbeat_interval: float = 2.0, **changes: Any) -> Node:
        cluster = ClusterSettings(
            redis_url=redis_url,
            secret=cluster_secret,
            node_id=f"node-{name}",
            heartbeat_interval=heartbeat_interval,
            heartbeat_expiry=max(6.0, 3 * heartbeat_interval),
        )
        # No shedding on loop lag: the nodes share this loop, so one node's start-up
        # would read as another's overload (each `serve` has a loop of its own).
        sip = SipSettings(
            DOMAIN, (PbxSettings(SERIAL, PBX_SECRET),), overload=OverloadSettings(lag=0)
        )
        push = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id=APP_ID)
        data_dir = tmp_path / name
        data_dir.mkdir()
        services = Services(
            load_policy("auerproxy"),
            Keyring.generate(),
            data_dir,
            clock,
            3600,
            push,
            sip,
            ("127.0.0.1", 0),
            cluster=cluster,
        )
        server = TestServer(build_app(replace(services, **changes)))
        await server.start_server()
        started.append(server)
        app = server.app
        nodes = app[SIP_SERVICE].nodes
        assert nodes is not None
        node = Node(name, server, app[RELAY], nodes, app[SIP_TRANSPORTS].address(Transport.TCP)[1])
        await node.rounds(1)  # subscribed: it hears every registration from now on
        return node

    yield start
    for server in reversed(started):
        await server.close()
