"""softrelay in the same process, on loopback, for the pytest plugin and `simulate`.

`EmbeddedRelay.start(workdir, ...)` writes a configuration the way an operator would
(`<workdir>/softrelay.toml`, each PBX secret, tenant key and crash key in a file of
`<workdir>/secrets/`, outside the data directory) and runs `serve`'s application from
it: HTTP on 127.0.0.1 and SIP (UDP and TCP) on 127.0.0.1, free ports, and the embedded
APNs and FCM stand-ins. Afterwards `softrelay audit --config <workdir>/softrelay.toml
--data-dir <workdir>/var` reads what it stored.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from mockphone.sip import RelayAddress
from privacy.clock import Clock, SystemClock
from privacy.keys import load_keyring
from privacy.logs import LogSet, setup_logging
from privacy.policy import load_policy
from privacy.store import Store
from push.embedded import StandIns
from softrelay.app import SIP_TRANSPORTS, STAND_INS, STORE, Services, build_app
from softrelay.config import Config, load_config

DOMAIN = "relay.test"
APP_ID = "com.example.softphone"
TENANT = "sim"


@dataclass(frozen=True, slots=True)
class CrashProject:
    id: str
    key: str = field(repr=False)


@dataclass
class EmbeddedRelay:
    config_file: Path
    config: Config
    runner: web.AppRunner
    logs: LogSet
    address: RelayAddress
    pbx_secrets: dict[str, str] = field(repr=False)
    tenant_key: str = field(repr=False)
    crash: CrashProject

    @classmethod
    async def start(
        cls,
        workdir: Path,
        *,
        serials: tuple[str, ...] = ("0042137",),
        profile: str = "auerproxy",
        wake_timeout: int = 30,
        clock: Clock | None = None,
        extra_toml: str = "",
    ) -> EmbeddedRelay:
        config_file, pbx_secrets, tenant_key, crash = _write_config(
            workdir, serials, profile, wake_timeout, extra_toml
        )
        config = load_config(config_file)
        return await cls.serve(
            config, config_file, clock or SystemClock(), pbx_secrets, tenant_key, crash
        )

    @classmethod
    async def serve(
        cls,
        config: Config,
        config_file: Path,
        clock: Clock,
        pbx_secrets: dict[str, str],
        tenant_key: str,
        crash: CrashProject,
    ) -> EmbeddedRelay:
        policy = load_policy(config.profile, config.policy_override)
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        logs = setup_logging(policy, config.data_dir, clock, console=False)
        services = Services(
            policy,
            load_keyring(config.keyring, config.data_dir),
            config.data_dir,
            clock,
            config.sweep_interval,
            config.push,
            config.sip,
            ("127.0.0.1", 0),
            crash=config.crashreports,
            provisioning=config.provisioning,
            oauth=config.oauth,
            usage=config.usage,
            dsr=config.dsr,
            sipis=config.sipis,  # SIPIS mode when `extra_toml` enables it
            contacts=config.contacts,
        )
        runner = web.AppRunner(build_app(services), access_log=None, handle_signals=False)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
        except BaseException:
            await runner.cleanup()
            logs.close()
            raise
        http_port = runner.addresses[0][1]
        ports = {kind.value: port for kind, (_, port) in runner.app[SIP_TRANSPORTS].addresses}
        address = RelayAddress(
            "127.0.0.1", ports["tcp"], f"http://127.0.0.1:{http_port}", udp_port=ports["udp"]
        )
        return cls(config_file, config, runner, logs, address, pbx_secrets, tenant_key, crash)

    @property
    def app(self) -> web.Application:
        return self.runner.app

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def domain(self) -> str:
        return self.config.sip.domain

    @property
    def stand_ins(self) -> StandIns:
        return self.app[STAND_INS]

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def dsn(self) -> str:
        """The crash-report DSN of the embedded project, for the stock sentry-sdk."""
        port = self.address.http_url.rsplit(":", 1)[1]
        return f"http://{self.crash.key}@127.0.0.1:{port}/{self.crash.id}"

    async def stop(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            self.logs.close()


def _write_config(
    workdir: Path, serials: tuple[str, ...], profile: str, wake_timeout: int, extra_toml: str
) -> tuple[Path, dict[str, str], str, CrashProject]:
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "secrets"
    keys.mkdir(mode=0o700, exist_ok=True)
    pbx_secrets = {serial: f"pbx-{secrets.token_hex(12)}" for serial in serials}
    tenant_key = secrets.token_hex(24)
    crash = CrashProject("1", secrets.token_hex(16))
    lines = [
        f'[server]\ndata_dir = "{workdir / "var"}"\nhttp_port = 0\nsip_port = 0\n',
        f'[policy]\nprofile = "{profile}"\n',
        "[logging]\nconsole = false\n",
        f'[push]\nembedded_app_id = "{APP_ID}"\n',
        f'[sip]\ndomain = "{DOMAIN}"\n',
        f'[sip.wake]\ntimeout = "{wake_timeout}s"\n',
        # Every mock phone connects from loopback: no per-address connection limit.
        "[sip.limits]\nmax_connections_per_ip = 0\n",
        # The relay shares its event loop with the stand-ins, the mock PBX and the mock
        # phones here: the loop's lag measures the simulation's own work, and shedding
        # on it would refuse the simulation's own phones (a REGISTER answered 503). A
        # relay of its own (`serve`, bench/simulate.py) keeps its overload guard.
        "[sip.overload]\nlag_ms = 0\n",
        "[usage]\nip_burst = 0\n",
    ]
    for serial, secret in pbx_secrets.items():
        _write_secret(keys / f"pbx-{serial}", secret)
        lines.append(f'[[sip.pbx]]\nserial = "{serial}"\nsecret = "file:{keys}/pbx-{serial}"\n')
    _write_secret(keys / "tenant", tenant_key)
    lines.append(f'[[usage.tenant]]\nid = "{TENANT}"\nkey = "file:{keys}/tenant"\n')
    lines.append(f'[[crashreports.project]]\nid = "{crash.id}"\nkey = "{crash.key}"\n')
    lines.append(extra_toml)
    config_file = workdir / "softrelay.toml"
    config_file.write_text("\n".join(lines), encoding="utf-8")
    return config_file, pbx_secrets, tenant_key, crash


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value + "\n")
