"""The apps softrelay pushes for, with their credentials, and where their pushes go.

Parsed once from the configuration (`[[push.app]]`), or made up by the embedded mode
for the local stand-ins. A binding's app id selects the app; its `pn-provider` selects
APNs (production or sandbox) or FCM.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomlsections.reader import Section


@dataclass(frozen=True, slots=True)
class ApnsCredentials:
    topic: str  # the bundle id; VoIP pushes go to "<topic>.voip"
    # Token auth (the .p8 key Apple issues), or certificate auth: one of the two.
    team_id: str = ""
    key_id: str = ""
    key_pem: str = field(default="", repr=False)
    cert_file: str = ""  # PEM holding the client certificate and its key

    @property
    def token_auth(self) -> bool:
        return bool(self.key_pem)


@dataclass(frozen=True, slots=True)
class FcmCredentials:
    project_id: str
    service_account: dict[str, Any] = field(repr=False)  # the JSON Google issues


@dataclass(frozen=True, slots=True)
class AppCredentials:
    app_id: str
    apns: ApnsCredentials | None = None
    fcm: FcmCredentials | None = None


@dataclass(frozen=True, slots=True)
class ApnsEndpoint:
    """Where APNs requests go instead of Apple (the stand-in); None means Apple."""

    host: str
    port: int
    ssl_context: ssl.SSLContext  # trusts the stand-in's throwaway CA


@dataclass(frozen=True, slots=True)
class FcmEndpoint:
    """Where FCM v1 requests go instead of Google (the stand-in); None means Google."""

    base_url: str  # e.g. http://127.0.0.1:PORT ; /v1/projects/<id>/messages:send is appended


DEFAULT_EMBEDDED_APP = "com.example.softphone"


@dataclass(frozen=True, slots=True)
class PushSettings:
    apps: tuple[AppCredentials, ...]
    max_in_flight: int
    max_attempts: int
    # With no app configured, `serve` runs the stand-ins in-process for this app id.
    embedded_app_id: str
    # Where the apps' pushes go instead of Apple and Google: stand-ins in a process of
    # their own (`push.fakes.process`, for benches and tests). Never from the config file.
    apns_endpoint: ApnsEndpoint | None = None
    fcm_endpoint: FcmEndpoint | None = None

    @property
    def embedded(self) -> bool:
        return not self.apps


def parse_push(sec: Section) -> PushSettings:
    """The `[push]` section; key files are read now, so a bad path stops the start."""
    apps = tuple(_parse_app(app) for app in sec.sections("app"))
    ids = [app.app_id for app in apps]
    for app_id in ids:
        if ids.count(app_id) > 1:
            raise sec.error("app", f"app id {app_id!r} is configured twice")
    settings = PushSettings(
        apps=apps,
        max_in_flight=sec.integer("max_in_flight", 200, minimum=1),
        max_attempts=sec.integer("max_attempts", 4, minimum=1),
        embedded_app_id=sec.text("embedded_app_id", DEFAULT_EMBEDDED_APP),
    )
    sec.finish()
    return settings


def _parse_app(sec: Section) -> AppCredentials:
    app_id = sec.text("id")
    apns: ApnsCredentials | None = None
    key_file, cert_file = sec.text("apns_key_file", ""), sec.text("apns_cert_file", "")
    team_id, key_id = sec.text("apns_team_id", ""), sec.text("apns_key_id", "")
    topic = sec.text("apns_topic", app_id)
    if key_file and cert_file:
        raise sec.error("apns_cert_file", "give apns_key_file (token auth) or this, not both")
    if key_file:
        if not (team_id and key_id):
            raise sec.error("apns_key_file", "token auth also needs apns_team_id and apns_key_id")
        apns = ApnsCredentials(topic, team_id, key_id, _read(sec, "apns_key_file", key_file))
    elif cert_file:
        _read(sec, "apns_cert_file", cert_file)
        apns = ApnsCredentials(topic, cert_file=cert_file)
    fcm: FcmCredentials | None = None
    account_file = sec.text("fcm_service_account_file", "")
    if account_file:
        try:
            account = json.loads(_read(sec, "fcm_service_account_file", account_file))
        except json.JSONDecodeError:
            raise sec.error("fcm_service_account_file", "is not a JSON service account") from None
        if not isinstance(account, dict) or not isinstance(account.get("project_id"), str):
            raise sec.error("fcm_service_account_file", "has no project_id")
        fcm = FcmCredentials(account["project_id"], account)
    sec.finish()
    if apns is None and fcm is None:
        raise sec.error("id", f"app {app_id!r} has neither APNs nor FCM credentials")
    return AppCredentials(app_id, apns, fcm)


def _read(sec: Section, key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise sec.error(key, f"cannot read {path}: {exc.strerror}") from None
