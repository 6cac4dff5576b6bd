"""The provisioning relay: phones fetch their configuration from their PBX through it.

    add_provisioning(app, settings, pbxs, clock, STORE, limiters)

adds the PBX tunnel endpoint (`TUNNEL_PATH`), the relay route (`ROUTE`) and a
cleanup context owning the HTTP client of PBXs configured by URL. The pieces:
`protocol.py` (the tunnel's frames, shared with the PBX side in
`mockphone/provisioning.py`), `tunnel.py` (the relay's side of the tunnel),
`relay.py` (the HTTP route), `paths.py` (which paths may reach a PBX), `settings.py`
(the `[provisioning]` section).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from privacy.clock import Clock
from privacy.store import Store
from proxy.provisioning.protocol import SUBPROTOCOL, TUNNEL_PATH
from proxy.provisioning.relay import METHODS, ROUTE, ProvisioningRelay
from proxy.provisioning.settings import ProvisioningSettings
from proxy.provisioning.tunnel import TunnelHub
from proxy.sip.settings import PbxSettings
from webapi.errors import Refusal
from webapi.openapi import OPENAPI, RETRY_AFTER, OpenApi, refusal, websocket_upgrade
from webapi.ratelimit import Limiters

TUNNELS = web.AppKey("provisioning_tunnels", TunnelHub)
PROVISIONING = web.AppKey("provisioning", ProvisioningRelay)


def add_provisioning(
    app: web.Application,
    settings: ProvisioningSettings,
    pbxs: tuple[PbxSettings, ...],
    clock: Clock,
    store: web.AppKey[Store],
    limiters: Limiters,
) -> None:
    limiter = limiters("provisioning", settings.rate)  # one budget per client, both routes
    hub = TunnelHub({p.serial: p.secret for p in pbxs if p.secret}, settings, limiter)
    app[TUNNELS] = hub

    async def context(app: web.Application) -> AsyncIterator[None]:
        # No cookie jar: one PBX's cookies must never reach another phone's request.
        async with aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        ) as session:
            app[PROVISIONING] = ProvisioningRelay(settings, pbxs, hub, app[store], limiter, session)
            yield

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[PROVISIONING].handle(request)

    async def not_allowed(request: web.Request) -> web.StreamResponse:
        raise Refusal(405, "method_not_allowed", f"use one of {', '.join(METHODS)}")

    app.cleanup_ctx.append(context)
    app.on_shutdown.append(hub.shutdown)
    # The tunnel first: its path would otherwise match the relay route (serial "v1").
    app.router.add_get(TUNNEL_PATH, hub.handle)
    for method in METHODS:
        app.router.add_route(method, ROUTE, handle)
    app.router.add_route("*", ROUTE, not_allowed)
    if OPENAPI in app:  # build_app's registry; a test's bare app has none
        _describe(app[OPENAPI])


def _describe(openapi: OpenApi) -> None:
    limited = refusal("rate_limited: too many requests from this address", RETRY_AFTER)
    openapi.operation(
        TUNNEL_PATH,
        "get",
        websocket_upgrade(
            "A PBX's tunnel: it proves its serial (HMAC challenge), then serves the "
            "phones' requests multiplexed over binary frames (proxy/provisioning/protocol.py)",
            SUBPROTOCOL,
            {
                "400": refusal("subprotocol_required"),
                "426": refusal("websocket_required: no WebSocket upgrade"),
                "429": limited,
            },
        ),
    )
    relayed = {
        "parameters": [
            {"name": "serial", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "path",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "the path on the PBX's provisioning server",
            },
        ],
        "responses": {
            "400": refusal(
                "bad_path: '.' or '..' segments in any encoding, '\\', ';', '?', '#',"
                " control characters"
            ),
            "404": refusal("unknown_serial: no PBX with this serial is served here"),
            "413": refusal("body_too_large"),
            "429": limited,
            "502": refusal("pbx_failed, response_too_large: a broken answer"),
            "503": refusal("pbx_offline, pbx_unavailable, pbx_unreachable", RETRY_AFTER),
            "504": refusal("pbx_timeout"),
            # What the PBX answers passes through unchanged, whatever its status.
            "default": {"description": "The PBX's answer, passed through unchanged"},
        },
    }
    body = {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
    for method in METHODS:
        spec = relayed | {"summary": f"{method} a file of the PBX's provisioning server"}
        if method in ("POST", "PUT"):
            spec["requestBody"] = body
        openapi.operation("/provisioning/{serial}/{path}", method.lower(), spec)


__all__ = ["PROVISIONING", "TUNNELS", "ProvisioningSettings", "add_provisioning"]
