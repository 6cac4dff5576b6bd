"""softrelay's own errors, sent with `sentry-sdk` to a DSN (off by default).

`before_send` runs the same scrubbing chain as the ingest, so softrelay reports about
itself hold no more than a phone's report may: the client IP, headers with secrets,
e-mail addresses in messages and the like are gone before the SDK sends.
"""

from __future__ import annotations

from typing import Any

import sentry_sdk

from crashreports.scrubber import Chain, DropEvent
from crashreports.settings import CrashSettings


def before_send(chain: Chain) -> Any:
    def scrub(event: Any, hint: Any) -> Any:
        try:
            return chain(dict(event))
        except DropEvent:
            return None

    return scrub


def start_self_reporting(settings: CrashSettings, release: str) -> bool:
    """Initialise the SDK when a DSN is configured; True if it is on."""
    if not settings.self_dsn:
        return False
    sentry_sdk.init(
        dsn=settings.self_dsn,
        release=release,
        environment=settings.self_environment,
        include_local_variables=True,
        max_breadcrumbs=50,
        traces_sample_rate=None,
        before_send=before_send(settings.self_chain),
    )
    return True


def stop_self_reporting() -> None:
    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=5)
        client.close()
    sentry_sdk.get_global_scope().set_client(None)
