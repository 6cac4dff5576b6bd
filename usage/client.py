"""The app's side of usage pings: what an app does, as a reference and for mock phones.

- A random install secret is made once, on first use, and kept in a small state file
  (mode 0600). It is never derived from a phone number, a SIP URI or a device id, so the
  pseudonymous id below names nothing the server or anyone else knows.
- `pid = HMAC-SHA256(install_secret, tenant ‖ period)[:16]`, 32 hex digits. The period
  ("YYYY-MM") is fixed-width, so the concatenation is unambiguous. Ids of different
  months cannot be linked without the install secret, which never leaves the device.
- The cadence: ping when the app is used and 14 days have passed since the last ping,
  **or** the month has changed since it. Without the second part, a ping on 25 January
  and a single use on 5 February would leave the install uncounted in February.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from usage.endpoint import PING_PATH
from usage.period import period_of

PING_EVERY = 14 * 86400
SECRET_BYTES = 32


def pseudonymous_id(install_secret: bytes, tenant: str, period: str) -> str:
    digest = hmac.digest(install_secret, (tenant + period).encode(), hashlib.sha256)
    return digest[:16].hex()


def is_due(last_ping: float | None, now: float) -> bool:
    """The cadence rule: never pinged, 14 days passed, or a new month since."""
    if last_ping is None:
        return True
    return now - last_ping >= PING_EVERY or period_of(now) != period_of(last_ping)


@dataclass(slots=True)
class UsageState:
    install_secret: bytes = field(repr=False)
    last_ping: float | None = None

    @classmethod
    def load(cls, path: Path) -> UsageState:
        """Read the state file, or create it with a new random install secret."""
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            state = cls(secrets.token_bytes(SECRET_BYTES))
            state.save(path)
            return state
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a usage state file") from exc
        try:
            secret = base64.b64decode(data["install_secret"], validate=True)
            last = data["last_ping"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a usage state file") from exc
        if len(secret) != SECRET_BYTES or not isinstance(last, int | float | None):
            raise ValueError(f"{path}: not a usage state file")
        return cls(secret, None if last is None else float(last))

    def save(self, path: Path) -> None:
        """Replace the file atomically, owner-only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                orjson.dumps(
                    {
                        "install_secret": base64.b64encode(self.install_secret).decode(),
                        "last_ping": self.last_ping,
                    }
                )
            )
        tmp.replace(path)


class UsageClient:
    """One app install of one tenant, pinging `base_url` when the cadence says so."""

    def __init__(
        self,
        state_file: Path,
        *,
        tenant: str,
        tenant_key: str,
        platform: str,
        app_version: str,
    ) -> None:
        self.state_file = state_file
        self.state = UsageState.load(state_file)
        self.tenant = tenant
        self._key = tenant_key
        self.platform = platform
        self.app_version = app_version

    def due(self, now: float) -> bool:
        return is_due(self.state.last_ping, now)

    def ping_body(self, now: float) -> dict[str, Any]:
        period = period_of(now)
        return {
            "tenant": self.tenant,
            "period": period,
            "pid": pseudonymous_id(self.state.install_secret, self.tenant, period),
            "platform": self.platform,
            "app_version": self.app_version,
        }

    async def used(self, session: aiohttp.ClientSession, base_url: str, now: float) -> int | None:
        """The app was used at `now`: ping if due. The HTTP status, or None if not due.
        Only an accepted ping (202) moves the cadence on; anything else is tried again
        at the next use."""
        if not self.due(now):
            return None
        async with session.post(
            base_url.rstrip("/") + PING_PATH,
            data=orjson.dumps(self.ping_body(now)),
            headers={
                "Authorization": f"Bearer {self._key}",
                "Content-Type": "application/json",
            },
        ) as response:
            await response.read()
            if response.status == 202:
                self.state.last_ping = now
                self.state.save(self.state_file)
            return response.status
