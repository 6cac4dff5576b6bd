"""The provisioning relay: a PBX dials its tunnel, phones fetch their files through it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mockphone.provisioning import PbxTunnel, TunnelRefused, TunnelRequest, TunnelResponse
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.retention import Sweeper
from proxy.provisioning import TUNNELS
from proxy.provisioning.settings import ProvisioningSettings
from proxy.sip.settings import PbxSettings, SipSettings
from push.apps import PushSettings
from softrelay.app import STORE, Services, build_app
from softrelay.config import ConfigError, load_config
from webapi.ratelimit import RateLimit, RateLimiter

SERIAL = "0042137"
SECRET = "tunnel-secret-5b1f"
PHONE_IP = "127.0.0.77"  # the phone's source address: loopback, but not the relay's
PUSH = PushSettings(apps=(), max_in_flight=10, max_attempts=2, embedded_app_id="com.example.t")
MiB = 1024 * 1024


@dataclass
class Relay:
    base: str
    app: web.Application
    clock: ManualClock
    data_dir: Path

    def phone(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(local_addr=(PHONE_IP, 0), force_close=True)
        return aiohttp.ClientSession(connector=connector, auto_decompress=False)


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(tmp_path: Path, clock: ManualClock) -> AsyncIterator[RelayFactory]:
    async with AsyncExitStack() as stack:

        async def start(settings: ProvisioningSettings | None = None, *extra: PbxSettings) -> Relay:
            pbxs = (PbxSettings(SERIAL, SECRET), PbxSettings("0000001", "other-secret"), *extra)
            services = Services(
                load_policy("auerproxy"),
                Keyring.generate(),
                tmp_path,
                clock,
                sweep_interval=3600,
                push=PUSH,
                sip=SipSettings(pbxs=pbxs),
                provisioning=settings or ProvisioningSettings(),
            )
            app = build_app(services)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            stack.push_async_callback(server.close)
            return Relay(str(server.make_url("")).rstrip("/"), app, clock, tmp_path)

        yield start


def files(
    table: dict[str, bytes], seen: list[TunnelRequest] | None = None
) -> Callable[[TunnelRequest], Awaitable[TunnelResponse]]:
    async def serve(request: TunnelRequest) -> TunnelResponse:
        if seen is not None:
            seen.append(request)
        body = table.get(request.path)
        if body is None:
            return TunnelResponse(404, [("Content-Type", "text/plain")], b"no such file\n")
        return TunnelResponse(200, [("Content-Type", "application/xml")], body)

    return serve


def pattern(size: int, chunk: int = 64 * 1024) -> tuple[Callable[[], AsyncIterator[bytes]], str]:
    """A file of `size` bytes made lazily, chunk by chunk, and its SHA-256."""
    block = bytes(range(256)) * (chunk // 256)
    digest = hashlib.sha256()
    for start in range(0, size, chunk):
        digest.update(block[: min(chunk, size - start)])

    async def produce() -> AsyncIterator[bytes]:
        for start in range(0, size, chunk):
            yield block[: min(chunk, size - start)]

    return produce, digest.hexdigest()


async def test_phone_fetches_its_file_through_the_tunnel_byte_for_byte(
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay()
    config = b"<?xml version='1.0'?><config>" + bytes(range(256)) + b"</config>\r\n"
    seen: list[TunnelRequest] = []
    pbx = await PbxTunnel.connect(
        relay.base, SERIAL, SECRET, files({"/phone/cfg.xml": config}, seen)
    )
    try:
        async with relay.phone() as phone:
            async with phone.get(
                f"{relay.base}/provisioning/{SERIAL}/phone/cfg.xml?mac=0004f2aabbcc",
                headers={"Authorization": "Basic YWxpY2U6czNjcmV0", "User-Agent": "Yealink T54W"},
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "application/xml"
                assert await resp.read() == config
            async with phone.get(f"{relay.base}/provisioning/{SERIAL}/missing") as resp:
                assert resp.status == 404, "the PBX's own status comes back unchanged"
                assert await resp.read() == b"no such file\n"
            async with phone.post(
                f"{relay.base}/provisioning/{SERIAL}/phone/status", data=b"uploaded"
            ) as resp:
                assert resp.status == 404
    finally:
        await pbx.close()
    first = seen[0]
    assert (first.method, first.path, first.query) == ("GET", "/phone/cfg.xml", "mac=0004f2aabbcc")
    assert first.header("Authorization") == "Basic YWxpY2U6czNjcmV0", "credentials are forwarded"
    assert first.header("User-Agent") == "Yealink T54W"
    assert first.header("Host") is None
    assert first.header("X-Forwarded-For") is None
    assert (seen[2].method, seen[2].body) == ("POST", b"uploaded")


async def test_a_large_file_streams_without_being_held_in_memory(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    size = 32 * MiB
    produce, expected = pattern(size)

    async def serve(request: TunnelRequest) -> TunnelResponse:
        return TunnelResponse(200, [("Content-Length", str(size))], produce())

    pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, serve)
    digest, received = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        async with (
            relay.phone() as phone,
            phone.get(f"{relay.base}/provisioning/{SERIAL}/firmware.rom") as resp,
        ):
            assert resp.status == 200
            assert resp.content_length == size
            async for chunk in resp.content.iter_chunked(256 * 1024):
                digest.update(chunk)
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await pbx.close()
    assert received == size
    assert digest.hexdigest() == expected, "byte for byte"
    # PBX, relay and phone share this process: together they held a few windows, not 32 MiB.
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB for a {size // MiB} MiB file"


async def test_a_phone_that_stops_reading_stops_the_pbx(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    size = 64 * MiB
    produce, expected = pattern(size)

    async def serve(request: TunnelRequest) -> TunnelResponse:
        return TunnelResponse(200, [], produce())

    pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, serve)
    try:
        async with (
            relay.phone() as phone,
            phone.get(f"{relay.base}/provisioning/{SERIAL}/big") as resp,
        ):
            assert resp.status == 200
            # The phone reads nothing: socket buffers fill, the relay stops granting
            # credit, and the PBX waits instead of pushing the whole file.
            await asyncio.wait_for(pbx.stalled.wait(), 10)
            sent_while_paused = await _steady(pbx)
            assert sent_while_paused < size // 3, sent_while_paused
            digest = hashlib.sha256()
            async for chunk in resp.content.iter_chunked(256 * 1024):
                digest.update(chunk)
        assert digest.hexdigest() == expected
    finally:
        await pbx.close()


async def test_unknown_serial_is_404_and_offline_pbx_is_503(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    async with relay.phone() as phone:
        async with phone.get(f"{relay.base}/provisioning/9999999/cfg.xml") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "unknown_serial"
        async with phone.get(f"{relay.base}/provisioning/{SERIAL}/cfg.xml") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "pbx_offline"
            assert int(resp.headers["Retry-After"]) > 0
        pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, files({}))
        tunnel = relay.app[TUNNELS].get(SERIAL)
        assert tunnel is not None
        await pbx.close()
        await asyncio.wait_for(tunnel.ended.wait(), 10)
        async with phone.get(f"{relay.base}/provisioning/{SERIAL}/cfg.xml") as resp:
            assert resp.status == 503, "a PBX whose tunnel closed is offline again"
        async with phone.get(f"{relay.base}/provisioning/{SERIAL}/a/../b") as resp:
            assert resp.status in (400, 503)  # aiohttp may normalise the path first
        async with phone.delete(f"{relay.base}/provisioning/{SERIAL}/cfg.xml") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"


async def test_a_wrong_secret_or_unknown_serial_cannot_open_a_tunnel(
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay()
    with pytest.raises(TunnelRefused):
        await PbxTunnel.connect(relay.base, SERIAL, "not-the-secret", files({}))
    with pytest.raises(TunnelRefused):
        await PbxTunnel.connect(relay.base, "7777777", SECRET, files({}))
    with pytest.raises(TunnelRefused):  # another PBX's valid secret does not open this serial
        await PbxTunnel.connect(relay.base, SERIAL, "other-secret", files({}))
    assert relay.app[TUNNELS].get(SERIAL) is None
    async with relay.phone() as phone, phone.get(f"{relay.base}/provisioning/v1/tunnel") as resp:
        assert resp.status == 426, "the tunnel is a WebSocket"


async def test_a_newer_tunnel_replaces_the_older_one(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    old = await PbxTunnel.connect(relay.base, SERIAL, SECRET, files({"/f": b"old"}))
    new = await PbxTunnel.connect(relay.base, SERIAL, SECRET, files({"/f": b"new"}))
    try:
        await asyncio.wait_for(old.wait_closed(), 10)
        async with relay.phone() as phone, phone.get(f"{relay.base}/provisioning/{SERIAL}/f") as r:
            assert await r.read() == b"new"
    finally:
        await old.close()
        await new.close()


async def test_a_pbx_that_drops_mid_body_cuts_the_phone_off(start_relay: RelayFactory) -> None:
    relay = await start_relay()
    dropped = asyncio.Event()

    async def serve(request: TunnelRequest) -> TunnelResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            dropped.set()
            await asyncio.Event().wait()  # the PBX's tunnel dies before the rest

        return TunnelResponse(200, [("Content-Length", "5000")], body())

    pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, serve)
    async with relay.phone() as phone, phone.get(f"{relay.base}/provisioning/{SERIAL}/f") as resp:
        assert resp.status == 200
        await asyncio.wait_for(dropped.wait(), 10)
        await pbx.close()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_a_pbx_that_never_answers_gives_504(start_relay: RelayFactory) -> None:
    relay = await start_relay(ProvisioningSettings(timeout=0.2))

    async def serve(request: TunnelRequest) -> TunnelResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, serve)
    try:
        async with relay.phone() as phone, phone.get(f"{relay.base}/provisioning/{SERIAL}/f") as r:
            assert r.status == 504
            assert (await r.json())["error"] == "pbx_timeout"
        assert relay.app[TUNNELS].get(SERIAL) is not None
    finally:
        await pbx.close()


async def test_request_body_over_the_cap_is_413(start_relay: RelayFactory) -> None:
    relay = await start_relay(ProvisioningSettings(max_request_body=1024))
    pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, files({}))
    try:
        async with relay.phone() as phone:
            url = f"{relay.base}/provisioning/{SERIAL}/upload"
            async with phone.put(url, data=b"x" * 2048) as resp:
                assert resp.status == 413
                assert (await resp.json())["error"] == "body_too_large"
    finally:
        await pbx.close()


async def test_a_pbx_configured_by_url_is_relayed_without_a_tunnel(
    start_relay: RelayFactory,
) -> None:
    seen: list[web.Request] = []

    async def provisioning_server(request: web.Request) -> web.Response:
        seen.append(request)
        body = b"url-config for " + request.query.get("mac", "").encode()
        return web.Response(body=body, headers={"Set-Cookie": "sid=abc", "X-Pbx": "1"})

    upstream_app = web.Application()
    upstream_app.router.add_get("/prov/{tail:.*}", provisioning_server)
    async with TestServer(upstream_app, host="127.0.0.1") as upstream:
        url = str(upstream.make_url("/prov/"))
        relay = await start_relay(None, PbxSettings("0000777", "", provisioning_url=url))
        async with relay.phone() as phone:
            for _ in range(2):
                async with phone.get(
                    f"{relay.base}/provisioning/0000777/phones/a.cfg?mac=0004f2",
                    headers={"Authorization": "Bearer phone-token"},
                ) as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"url-config for 0004f2"
                    assert resp.headers["X-Pbx"] == "1"
                    assert resp.headers["Set-Cookie"] == "sid=abc"
    assert seen[0].path == "/prov/phones/a.cfg"
    assert seen[0].headers["Authorization"] == "Bearer phone-token"
    # The relay keeps no cookie jar: the PBX's cookie never rides along to the next phone.
    assert "Cookie" not in seen[1].headers


async def test_url_pbx_that_is_down_gives_503(start_relay: RelayFactory) -> None:
    relay = await start_relay(
        None, PbxSettings("0000778", "", provisioning_url="http://127.0.0.1:9/prov")
    )
    async with (
        relay.phone() as phone,
        phone.get(f"{relay.base}/provisioning/0000778/a.cfg") as resp,
    ):
        assert resp.status == 503
        assert (await resp.json())["error"] == "pbx_unreachable"


async def test_the_log_holds_anonymised_ips_only_and_is_empty_after_12_months(
    start_relay: RelayFactory, clock: ManualClock
) -> None:
    relay = await start_relay()
    pbx = await PbxTunnel.connect(relay.base, SERIAL, SECRET, files({"/c": b"c"}))
    try:
        async with relay.phone() as phone:
            for _ in range(3):
                async with phone.get(f"{relay.base}/provisioning/{SERIAL}/c") as resp:
                    assert resp.status == 200
            async with phone.get(f"{relay.base}/provisioning/9999999/c") as resp:
                assert resp.status == 404
    finally:
        await pbx.close()
    store = relay.app[STORE]
    records = await store.find("provisioning_log")
    assert len(records) == 3, "one line per access to a configured serial"
    for record in records:
        assert record.fields == {"ip_prefix": "127.0.0.0", "pbx_serial": SERIAL}
        assert record.created_at == clock.now()
    sweeper = Sweeper(store, relay.data_dir)
    clock.advance(365 * 86400 - 1)
    await sweeper.run_once()
    assert len(await store.find("provisioning_log")) == 3, "kept for 12 months"
    clock.advance(2)
    await sweeper.run_once()
    assert await store.find("provisioning_log") == []
    assert (await store.stats())["provisioning_log"].rows == 0


async def test_per_ip_rate_limit_then_refill(start_relay: RelayFactory, clock: ManualClock) -> None:
    relay = await start_relay(ProvisioningSettings(rate=RateLimit(per_minute=60, burst=2)))
    async with relay.phone() as phone:
        url = f"{relay.base}/provisioning/{SERIAL}/c"
        statuses = []
        for _ in range(3):
            async with phone.get(url) as resp:
                statuses.append(resp.status)
                retry = resp.headers.get("Retry-After")
        assert statuses == [503, 503, 429]
        assert retry == "1"
        clock.advance(1)
        async with phone.get(url) as resp:
            assert resp.status == 503


def test_rate_limiter_forgets_addresses_once_their_bucket_is_full() -> None:
    clock = ManualClock(0)
    limiter = RateLimiter(RateLimit(per_minute=60, burst=3), clock)
    assert [limiter.check("203.0.113.7") for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    assert limiter.check("2001:db8::1") == 0.0
    assert limiter.check("2001:db8::2") == 0.0
    assert len(limiter) == 2, "IPv6 counted per /64"
    clock.advance(3)  # burst / rate: every bucket is full again
    assert limiter.check("198.51.100.1") == 0.0
    assert len(limiter) == 1, "only the address just seen is still in memory"
    bounded = RateLimiter(RateLimit(per_minute=60, burst=3, max_tracked=2), clock)
    for n in range(5):
        bounded.check(f"192.0.2.{n}")
    assert len(bounded) == 2


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "softrelay.toml"
    config.write_text("[provisioning]\nmax_streams = 3\n")
    with pytest.raises(
        ConfigError, match=r"softrelay\.toml: provisioning\.max_streams: unknown key"
    ):
        load_config(config)
    config.write_text('[provisioning]\ntimeout = "0s"\n')
    with pytest.raises(ConfigError, match=r"provisioning\.timeout: must be at least 1s"):
        load_config(config)
    config.write_text(
        '[[sip.pbx]]\nserial = "1"\nstatic = "udp:127.0.0.1:5070"\nprovisioning_url = "ftp://x"\n'
    )
    with pytest.raises(ConfigError, match=r"sip\.pbx\[0\]\.provisioning_url: expected an http"):
        load_config(config)
    config.write_text(
        "[provisioning]\nrate_per_minute = 10\nrate_burst = 4\nmax_response_body = 1000\n"
        '[[sip.pbx]]\nserial = "1"\nstatic = "udp:127.0.0.1:5070"\n'
        'provisioning_url = "https://pbx.example.com/prov"\n'
    )
    loaded = load_config(config)
    assert loaded.provisioning.rate == RateLimit(per_minute=10, burst=4)
    assert loaded.provisioning.max_response_body == 1000
    assert loaded.sip.pbxs[0].provisioning_url == "https://pbx.example.com/prov"


async def _steady(pbx: PbxTunnel) -> int:
    """The bytes the PBX sent once it has waited for credit, without progress, 20 polls."""
    last, same = -1, 0
    async with asyncio.timeout(20):
        while same < 20:
            await asyncio.sleep(0.01)
            same = same + 1 if pbx.waiting_for_credit and pbx.bytes_sent == last else 0
            last = pbx.bytes_sent
    return last


# --- the canary audit, with `softrelay serve` as a user runs it -------------------------


async def test_canaries_in_the_file_and_the_credentials_leave_no_trace(tmp_path: Path) -> None:
    canary_file = "CANARY-FILE-9f3e1c7a"
    canary_password = "CANARY-PASS-41d2b8e0"
    secret_file = tmp_path / "pbx.secret"
    secret_file.write_text(SECRET)
    config = tmp_path / "softrelay.toml"
    config.write_text(f'[[sip.pbx]]\nserial = "{SERIAL}"\nsecret = "file:{secret_file}"\n')
    data_dir = tmp_path / "var"
    env = {**os.environ, "SOFTRELAY_CONFIG": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "softrelay.cli", "serve", "--config", str(config),
        "--data-dir", str(data_dir), "--http-port", "0", "--sip-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        match = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        base = f"http://127.0.0.1:{int(match.group(1))}"
        auth = "Basic " + base64.b64encode(f"alice:{canary_password}".encode()).decode()
        body = f"<config><sip_password>{canary_file}</sip_password></config>".encode()
        seen: list[TunnelRequest] = []
        pbx = await PbxTunnel.connect(base, SERIAL, SECRET, files({"/cfg.xml": body}, seen))
        try:
            connector = aiohttp.TCPConnector(local_addr=(PHONE_IP, 0))
            async with aiohttp.ClientSession(connector=connector) as phone:
                url = f"{base}/provisioning/{SERIAL}/cfg.xml"
                async with phone.get(url, headers={"Authorization": auth}) as resp:
                    assert resp.status == 200
                    assert await resp.read() == body
        finally:
            await pbx.close()
        assert seen[0].header("Authorization") == auth
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    status, report = await _audit(
        config, data_dir, canary_file, canary_password, auth, PHONE_IP, SECRET
    )
    assert status == 0, report
    assert "no canary found" in report
    # ...while the scan does read the data: the access was logged, with the serial.
    status, report = await _audit(config, data_dir, SERIAL)
    assert status == 1, report


async def _audit(config: Path, data_dir: Path, *canaries: str) -> tuple[int, str]:
    args = [arg for canary in canaries for arg in ("--canary", canary)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "softrelay.cli", "audit", "--config", str(config),
        "--data-dir", str(data_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SOFTRELAY_CONFIG": ""},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
