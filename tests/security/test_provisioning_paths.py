"""Traversal in any spelling stops at the relay: a phone's path that any server could
read as leaving the PBX's provisioning root (a backslash, a `;` parameter, dots encoded
once, twice, in mixed case, as overlong UTF-8 or Unicode look-alikes, a NUL) gets 400
`bad_path`, and the PBX, whether reached through its tunnel or by URL, receives none of
them. Requests are written byte for byte on a socket, so no client library normalises
them first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mockphone.provisioning import PbxTunnel, TunnelRequest, TunnelResponse
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from proxy.provisioning.paths import BadPath, check_path
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import Services, build_app
from webapi.ratelimit import RateLimit

TUNNEL_SERIAL = "0042137"
URL_SERIAL = "0000777"
SECRET = "tunnel-secret-5b1f"
PHONE_IP = "127.0.0.77"
STEP_TIMEOUT = 10.0
PUSH = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.t")

ATTACKS = (
    # plain, as the old check already refused
    "../x",
    "a/../../x",
    # backslashes, raw and encoded
    "..\\..\\x",
    "..%5c..%5cx",
    "a\\..\\..\\etc\\passwd",
    "..%5C..%5Cx",
    # path parameters
    "..;/x",
    "a/..;/..;/x",
    "%2e%2e;/x",
    "a;jsessionid=1/../x",
    # encoded once, mixed case, partly
    "%2e%2e/x",
    "%2E%2e/x",
    "%2e%2E%2fx",
    ".%2e/x",
    "%2e./x",
    "a/%2e%2e%2f%2e%2e%2fx",
    # encoded twice and more, also with the escape's own digits encoded
    "%252e%252e/x",
    "%252E%252e%252Fx",
    "%25252e%25252e/x",
    "%25%32%65%25%32%65/x",
    "%%32%65%%32%65/x",
    "%2525252525252e%2525252525252e/x",
    # overlong UTF-8 of '.', '/' and '\\'
    "%c0%ae%c0%ae/x",
    "%e0%80%ae%e0%80%ae/x",
    "..%c0%afx",
    "..%c1%9cx",
    "%25c0%25ae%25c0%25ae/x",
    # IIS's %u escapes, and Unicode look-alikes that NFKC folds to dots
    "%u002e%u002e/x",
    "%ef%bc%8e%ef%bc%8e/x",
    "%e2%80%a5/x",
    # what Windows servers trim: trailing dots and spaces
    ".../x",
    "..%20/x",
    # NUL and other controls, encoded once and twice
    "x.cfg%00.xml",
    "..%00/x",
    "x%2500.cfg",
    "x%0d%0aHost:%20evil",
)


@dataclass
class Pbxs:
    """Both kinds of PBX provisioning server, each recording every path it received."""

    base: str
    tunnel_paths: list[str] = field(default_factory=list)
    url_paths: list[str] = field(default_factory=list)


async def raw_get(base: str, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written, from the phone's address; status and body
    (HTTP/1.0: one answer, not chunked)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), local_addr=(PHONE_IP, 0)), STEP_TIMEOUT
    )
    try:
        writer.write(f"GET {target} HTTP/1.0\r\nHost: relay\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), STEP_TIMEOUT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
async def pbxs(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Pbxs]:
    """The relay as `serve` builds it (no rate limit, so every attack gets its own
    answer) with one PBX on a tunnel and one configured by URL."""
    received: list[str] = []

    async def url_server(request: web.Request) -> web.Response:
        received.append(request.raw_path)
        return web.Response(text="file\n")

    upstream_app = web.Application()
    upstream_app.router.add_route("*", "/{tail:.*}", url_server)
    async with TestServer(upstream_app, host="127.0.0.1") as upstream:
        url = str(upstream.make_url("/prov/"))
        services = Services(
            load_policy("auerproxy"),
            Keyring.generate(),
            tmp_path,
            clock,
            sweep_interval=3600,
            push=PUSH,
            sip=SipSettings(
                pbxs=(
                    PbxSettings(TUNNEL_SERIAL, SECRET),
                    PbxSettings(URL_SERIAL, "", provisioning_url=url),
                )
            ),
            provisioning=ProvisioningSettings(rate=RateLimit(per_minute=0)),
        )
        async with TestServer(build_app(services), host="127.0.0.1") as server:
            base = str(server.make_url("")).rstrip("/")
            found = Pbxs(base, url_paths=received)

            async def tunnel_server(request: TunnelRequest) -> TunnelResponse:
                found.tunnel_paths.append(request.path)
                return TunnelResponse(200, [("Content-Type", "text/plain")], b"file\n")

            tunnel = await PbxTunnel.connect(base, TUNNEL_SERIAL, SECRET, tunnel_server)
            try:
                yield found
            finally:
                await tunnel.close()


async def test_no_spelling_of_traversal_reaches_either_pbx(pbxs: Pbxs) -> None:
    for serial in (TUNNEL_SERIAL, URL_SERIAL):
        for attack in ATTACKS:
            status, body = await raw_get(pbxs.base, f"/provisioning/{serial}/{attack}")
            assert status == 400, (serial, attack, body)
            assert orjson.loads(body)["error"] == "bad_path", (serial, attack, body)
    assert pbxs.tunnel_paths == []
    assert pbxs.url_paths == []


async def test_ordinary_paths_still_reach_both_pbxs(pbxs: Pbxs) -> None:
    """The recorders work, and the check refuses spellings, not files: names with dots,
    a literal percent, an escape that decodes to a harmless character."""
    fine = ("phone/cfg.xml", "a/.hidden", "fw/v1.2..3.bin", "y%2541.cfg", "100%25.txt")
    for serial in (TUNNEL_SERIAL, URL_SERIAL):
        for path in fine:
            status, body = await raw_get(pbxs.base, f"/provisioning/{serial}/{path}")
            assert (status, body) == (200, b"file\n"), (serial, path)
    assert pbxs.tunnel_paths == [
        "/phone/cfg.xml",
        "/a/.hidden",
        "/fw/v1.2..3.bin",
        "/y%41.cfg",
        "/100%.txt",
    ]
    assert pbxs.url_paths == [
        "/prov/phone/cfg.xml",
        "/prov/a/.hidden",
        "/prov/fw/v1.2..3.bin",
        "/prov/y%2541.cfg",
        "/prov/100%25.txt",
    ]


@pytest.mark.parametrize("path", ["..", "a/%2e%2e", "%252e%252e", "..;", "..\\", "%c0%ae%c0%ae"])
def test_the_check_alone_refuses_each_class(path: str) -> None:
    with pytest.raises(BadPath):
        check_path(path)


def test_a_path_decoded_too_many_times_over_is_refused_not_followed() -> None:
    with pytest.raises(BadPath, match="more than"):
        check_path("%" + "25" * 6 + "41")  # 'A' under seven layers of encoding
    check_path("%" + "25" * 3 + "41")
