"""`softrelay simulate`: the command, and the worlds it plays in.

    softrelay simulate --phones 200 --duration 60     # against `make run`'s server
    softrelay simulate --embedded --phones 200 --duration 60
    softrelay simulate --target http://127.0.0.1:8080 --phones 200 --duration 60
    softrelay simulate --target http://127.0.0.1:8081?sip=5061,http://127.0.0.1:8082?sip=5062

The simulation itself (mock parties, events, statistics) is `mockphone/simulate.py`;
this module composes it with a relay: an embedded one started in this process, or a
running `serve` described by the same `--config`. See mockphone/simulate.py's docstring
for what happens in a run.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import re
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from mockphone.delays import Delay
from mockphone.phone import Kind
from mockphone.pushes import PushInbox
from mockphone.simulate import (
    CALLEE,
    PLACEMENTS,
    Node,
    SimSettings,
    Simulation,
    SimulationError,
    World,
    check,
    parse_shares,
    share_counts,
)
from mockphone.sip import RelayAddress, Transport
from mockphone.sipis import Provider, ProviderAccount
from softrelay.config import Config
from softrelay.embedded import EmbeddedRelay

# SIPIS mode on, for the SIPIS apps of `--mix sipis=...`: their provider is a Kamailio on
# loopback (a private address, refused by default), and a new account registers at once.
# Every app stores its account from loopback: no per-address limit on the accounts API.
_SIPIS_TOML = """
[sipis]
enabled = true
allow_private_registrars = true
start_spread = "0s"
rate_per_minute = 0
"""


# The contacts mix's devices all call the contacts API from this one process's address:
# no per-address limit on it (the quota and the global evaluation bucket stay).
_CONTACTS_TOML = """
[contacts]
rate_per_minute = 0
"""


# Crashes per second, in all, when neither --crash-rate nor a scenario sets it: a few a
# minute, so `softrelay simulate` against `make run` fills the console's crash page.
COMMAND_CRASH_RATE = 0.1


def sipis_apps(settings: SimSettings) -> int:
    """How many of the run's phones are SIPIS-mode apps."""
    return share_counts(settings.mix, settings.phones).get(Kind.SIPIS, 0)


class _Kamailio:
    """The provider of the SIPIS apps: a real Kamailio registrar and proxy, started by
    the repository's tests/kamailio.py (HA1-only accounts, loopback, a port of its own)."""

    def __init__(self, count: int) -> None:
        try:
            from tests.kamailio import DOMAIN, Kamailio, KamailioUnavailable, Subscriber
        except ImportError:
            raise SimulationError(
                "--mix sipis: the SIPIS apps' provider is a real Kamailio, which the source "
                "checkout's tests/kamailio.py starts; run simulate from a checkout"
            ) from None
        self.users = [Subscriber(f"sipis{i + 1}", secrets.token_hex(12)) for i in range(count)]
        # The line the apps call (the caller registers as it and answers).
        self.line = Subscriber(CALLEE, secrets.token_hex(12))
        try:
            self.server = Kamailio([*self.users, self.line])
        except KamailioUnavailable as exc:
            raise SimulationError(
                f"--mix sipis: the SIPIS apps' provider is a real Kamailio registrar: {exc}"
            ) from None
        self.domain = DOMAIN

    async def start(self) -> Provider:
        from tests.kamailio import KamailioError

        try:
            port = await asyncio.to_thread(self.server.start)
        except KamailioError as exc:
            raise SimulationError(f"--mix sipis: Kamailio did not start: {exc}") from None
        registrar = f"sip:127.0.0.1:{port};transport=udp"
        accounts = tuple(
            ProviderAccount(registrar, self.domain, u.user, u.password) for u in self.users
        )
        line = ProviderAccount(registrar, self.domain, self.line.user, self.line.password)
        return Provider("127.0.0.1", port, self.domain, accounts, line=line)

    async def close(self) -> None:
        await asyncio.to_thread(self.server.close)


async def embedded_world(settings: SimSettings, data_dir: Path | None) -> World:
    apps = sipis_apps(settings)
    # The SIPIS apps' provider first: a missing kamailio stops the run before anything.
    kamailio = _Kamailio(apps) if apps else None
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="softrelay-simulate-")
        workdir = Path(tmp.name)
    else:
        workdir = data_dir
    serials = tuple(f"{9000000 + i:07d}" for i in range(settings.pbxs))
    contacts_toml = _CONTACTS_TOML if settings.contacts > 0 else ""
    if kamailio is None:
        relay = await EmbeddedRelay.start(workdir, serials=serials, extra_toml=contacts_toml)
        return _embedded(relay, workdir, tmp)
    try:
        provider = await kamailio.start()
        try:
            relay = await EmbeddedRelay.start(
                workdir, serials=serials, extra_toml=_SIPIS_TOML + contacts_toml
            )
        except BaseException:
            await kamailio.close()
            raise
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise

    async def stop() -> None:
        try:
            await relay.stop()
        finally:
            await kamailio.close()

    world = _embedded(relay, workdir, tmp, stop)
    world.provider = provider
    return world


def _embedded(
    relay: EmbeddedRelay,
    workdir: Path,
    tmp: tempfile.TemporaryDirectory[str] | None,
    stop: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> World:
    return World(
        relay.address,
        relay.domain,
        relay.pbx_secrets,
        PushInbox.embedded(relay.stand_ins.deliveries),
        ("sim", relay.tenant_key),
        relay.dsn,
        relay.address.http_url + "/metrics",
        aiohttp.ClientSession(),
        workdir,
        stop or relay.stop,
        tmp,
    )


def parse_targets(values: list[str], default_sip_port: int) -> list[Node]:
    """`--target` values (repeated, or comma-separated in one) as nodes: each
    `http://HOST[:PORT][/][?sip=PORT]`, its SIP port this configuration's when not given
    (nodes on one host each have their own)."""
    nodes: list[Node] = []
    for value in values:
        for url in (part.strip() for part in value.split(",")):
            match = re.fullmatch(r"http://([^/:?]+)(?::(\d+))?/?(?:\?sip=(\d+))?", url)
            if match is None:
                raise SimulationError(f"--target {url}: expected http://HOST[:PORT][?sip=PORT]")
            host, port = match.group(1), int(match.group(2) or 80)
            sip_port = int(match.group(3)) if match.group(3) else default_sip_port
            if not (0 < port < 65536 and 0 < sip_port < 65536):
                raise SimulationError(f"--target {url}: a port must be 1 to 65535")
            http_url = f"http://{host}:{port}"
            name = f"{host}:{port}"
            if any(node.name == name for node in nodes):
                raise SimulationError(f"--target {url}: {name} is given twice")
            nodes.append(Node(name, RelayAddress(host, sip_port, http_url), http_url + "/metrics"))
    return nodes


async def target_world(settings: SimSettings, targets: list[str], config: Config) -> World:
    """Against running serves: one, or the nodes of a cluster (mockphone/simulate.py
    says how the parties are placed over them)."""
    if sipis_apps(settings):
        raise SimulationError(
            "--mix sipis: only with --embedded, which starts the SIPIS apps' provider "
            "(a real Kamailio) and a softrelay with SIPIS mode on for it"
        )
    nodes = parse_targets(targets, config.listen.sip_port)
    source = str(config.source or "<defaults>")
    pbxs = [p for p in config.sip.pbxs if p.secret and p.static is None]
    if not pbxs:
        raise SimulationError(
            f"{source}: sip.pbx: --target needs the [[sip.pbx]] serials and secrets of the "
            "server it plays against (or use --embedded)"
        )
    if settings.pbxs > len(pbxs):
        raise SimulationError(
            f"{source}: sip.pbx: --pbxs {settings.pbxs} but only {len(pbxs)} PBX(s) configured"
        )
    tenant = config.usage.tenants[0] if config.usage.tenants else None
    project = config.crashreports.projects[0] if config.crashreports.projects else None
    first = nodes[0]
    state = tempfile.TemporaryDirectory(prefix="softrelay-simulate-")
    session = aiohttp.ClientSession()
    # One inbox follows every node's feed: the node that parks a call pushes.
    inbox = PushInbox()
    for node in nodes:
        try:
            await inbox.follow(node.address.http_url, session)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await inbox.close()
            await session.close()
            state.cleanup()
            raise SimulationError(
                f"--target {node.address.http_url}: no push stand-ins' delivery feed there"
                f" ({exc}); it runs only when serve has no push credentials"
            ) from None
    world = World(
        first.address,
        config.sip.domain,
        {p.serial: p.secret for p in pbxs[: settings.pbxs]},
        inbox,
        (tenant.id, tenant.key) if tenant else None,
        f"http://{project.key}@{first.name}/{project.id}" if project else None,
        first.metrics_url,
        session,
        # The apps' usage state, fresh each run: every run is new installs (a state kept
        # in a shared directory would silence the pings of the next run, on any server).
        Path(state.name),
        _tmp=state,
        nodes=nodes,
    )
    # Every 127/8 address is the loopback interface on Linux, not elsewhere.
    world.own_addresses = sys.platform == "linux" and all(
        _is_loopback(node.address.host) for node in nodes
    )
    return world


def default_target(config: Config) -> str:
    """The HTTP address of a `serve` of this configuration, as a client reaches it."""
    host = config.listen.http_host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104  (a wildcard listen address, not a bind)
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.listen.http_port}"


async def reachable(url: str) -> bool:
    """Whether a softrelay answers `GET /healthz` at `url` within a second."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url.rstrip("/") + "/healthz") as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


# --- the run --------------------------------------------------------------------------


def add_simulate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    sim = sub.add_parser(
        "simulate", parents=[common], help="mock phones and PBXs against a softrelay"
    )
    where = sim.add_mutually_exclusive_group()
    where.add_argument("--embedded", action="store_true", help="start softrelay in-process")
    where.add_argument(
        "--target",
        action="append",
        metavar="URL",
        help="a running serve, http://HOST:PORT[?sip=PORT] (default: this config's HTTP address"
        " if it answers, else --embedded); several (repeated or comma-separated): the nodes"
        " of a cluster, phones and PBXs spread over them, figures per node",
    )
    sim.add_argument("--scenario", metavar="FILE", help="a TOML scenario (options override it)")
    sim.add_argument("--phones", type=int)
    sim.add_argument("--pbxs", type=int)
    sim.add_argument("--duration", type=float, help="simulated seconds")
    sim.add_argument(
        "--mix",
        help="phone kinds, e.g. ios=0.4,android=0.4,desktop=0.2; sipis=SHARE adds SIPIS-mode"
        " apps (softrelay registers their accounts at a real Kamailio the run starts;"
        " --embedded only)",
    )
    sim.add_argument("--transports", help="e.g. tcp=0.8,ws=0.1,udp=0.1 (udp: desktops only)")
    sim.add_argument("--call-rate", type=float, help="calls per second, in all")
    sim.add_argument("--sleep-rate", type=float, help="phones falling asleep per second")
    sim.add_argument(
        "--crash-rate",
        type=float,
        help=f"crashes per second, in all (default {COMMAND_CRASH_RATE}; 0: none)",
    )
    sim.add_argument(
        "--text-rate", type=float, help="texts per second to sleeping SIPIS apps, in all"
    )
    sim.add_argument(
        "--contacts",
        type=float,
        metavar="SHARE",
        help="share of the relay-mode phones whose users sync an encrypted book on two"
        " devices and find each other by Smart Contacts (PBX-proved devices; a --target"
        " serve needs [contacts] rate_per_minute = 0: every device calls from this host)",
    )
    sim.add_argument(
        "--contacts-rate", type=float, help="book edits, each with a discovery, per second"
    )
    sim.add_argument("--opt-in", type=float, help="share of users opted in to crash reports")
    sim.add_argument("--wake-delay", help="push to re-REGISTER, e.g. lognormal:1.5,0.4")
    sim.add_argument(
        "--speed",
        type=float,
        help="simulated seconds per second (default 1); inf: a stepped pace, events one "
        "after another, as fast as the parties answer",
    )
    sim.add_argument("--seed", type=int)
    sim.add_argument(
        "--placement",
        choices=PLACEMENTS,
        help="with several targets: pbx (default) puts each phone on its PBX's node, spread"
        " deals each PBX's phones out over the nodes (calls cross nodes: a cluster forwards"
        " them)",
    )
    sim.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    sim.add_argument("--no-live", action="store_true", help="no live view, summary only")


def settings_from_args(args: argparse.Namespace, base: SimSettings) -> SimSettings:
    """The scenario's settings (or the defaults) with the command line's options on top."""
    changes: dict[str, Any] = {}
    for name in (
        "phones",
        "pbxs",
        "duration",
        "call_rate",
        "sleep_rate",
        "crash_rate",
        "text_rate",
        "contacts",
        "contacts_rate",
        "opt_in",
        "speed",
        "seed",
        "placement",
    ):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    try:
        if args.mix:
            changes["mix"] = parse_shares(args.mix, Kind, "--mix")
        if args.transports:
            changes["transports"] = parse_shares(args.transports, Transport, "--transports")
        if args.wake_delay:
            changes["wake_delay"] = Delay.parse(args.wake_delay)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    return check(replace(base, **changes), "option")


def simulate_command(args: argparse.Namespace, config: Config) -> int:
    """Run `softrelay simulate`; exit 0, or 2 for options or configuration that cannot
    work (one line naming the option, or the file and the key)."""
    import uvloop

    from mockphone.scenario import load_scenario
    from mockphone.view import LiveView, print_summary

    # The command's own default crash rate: a run shows every kind of traffic a console
    # panel counts (library users, the pytest plugin, keep SimSettings' none).
    defaults = SimSettings(crash_rate=COMMAND_CRASH_RATE)
    try:
        base = load_scenario(Path(args.scenario), defaults) if args.scenario else defaults
        settings = settings_from_args(args, base)
    except SimulationError as exc:
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        targets: list[str] | None = args.target
        # SIPIS apps need the world that starts their provider: the embedded one.
        if targets is None and not args.embedded and not sipis_apps(settings):
            # The plain command plays against `make run`'s server when one answers.
            target = default_target(config)
            if await reachable(target):
                targets = [target]
            else:
                print(
                    f"softrelay: simulate: no softrelay answers at {target}; starting one "
                    "in this process (--embedded)",
                    file=sys.stderr,
                )
        if targets:
            world = await target_world(settings, targets, config)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else None
            world = await embedded_world(settings, data_dir)
        try:
            simulation = Simulation(settings, world, stop)
            live = not args.no_live and sys.stdout.isatty()
            async with LiveView(simulation, enabled=live):
                stats = await simulation.run()
            stats.interrupted = stop.is_set()
            return stats.summary(settings)
        finally:
            await world.close()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            summary = runner.run(main())
    except SimulationError as exc:
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"softrelay: simulate: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return 0
