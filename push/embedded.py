"""The embedded default: APNs and FCM stand-ins in the same process.

With no push credentials configured, `softrelay serve` starts both stand-ins on
loopback with throwaway credentials for one app id, and the real aioapns and
firebase-admin clients talk to them. Tests, the simulator and `make run` therefore
need no outside network, and a mock phone receives its push from `deliveries`.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from privacy.clock import Clock
from push.apps import ApnsCredentials, AppCredentials, FcmCredentials
from push.fakes.apns import ApnsKeyGrant, FakeApns
from push.fakes.certs import ApnsSigningKey, ThrowawayCa
from push.fakes.fcm import FakeFcm
from push.fakes.script import Deliveries, Script


@dataclass
class StandIns:
    apns: FakeApns
    fcm: FakeFcm
    apps: tuple[AppCredentials, ...]
    deliveries: Deliveries  # both stand-ins record here
    script: Script  # both stand-ins answer from here
    _tmp: tempfile.TemporaryDirectory[str]

    @classmethod
    async def start(cls, app_ids: tuple[str, ...], clock: Clock) -> StandIns:
        tmp = tempfile.TemporaryDirectory(prefix="softrelay-push-")
        deliveries, script = Deliveries(), Script()
        try:
            # Key generation costs CPU (RSA for the service accounts): off the loop.
            ca = await asyncio.to_thread(ThrowawayCa.create, Path(tmp.name))
            keys = {app_id: ApnsSigningKey.generate() for app_id in app_ids}
            apns = await FakeApns.start(
                ca,
                keys=[ApnsKeyGrant.of(key, app_id) for app_id, key in keys.items()],
                script=script,
                deliveries=deliveries,
                clock=clock.now,
            )
            fcm = await FakeFcm.start(clock=clock, script=script, deliveries=deliveries)
        except BaseException:
            tmp.cleanup()
            raise
        apps = []
        for app_id in app_ids:
            key = keys[app_id]
            account = await asyncio.to_thread(fcm.new_service_account, _project(app_id))
            apps.append(
                AppCredentials(
                    app_id,
                    apns=ApnsCredentials(app_id, key.team_id, key.key_id, key.key_pem),
                    fcm=FcmCredentials(_project(app_id), account),
                )
            )
        return cls(apns, fcm, tuple(apps), deliveries, script, tmp)

    async def stop(self) -> None:
        try:
            await self.apns.stop()
            await self.fcm.stop()
        finally:
            self._tmp.cleanup()


def _project(app_id: str) -> str:
    """A Firebase-style project id for an app id (lower case, dashes)."""
    return app_id.lower().replace(".", "-").replace("_", "-")[:30]
