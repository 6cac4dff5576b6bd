"""The `softrelay` command.

    softrelay serve [--http-port N] [--sip-port N]
    softrelay sweep [--now ISO-8601]
    softrelay audit [--now ISO-8601] [--canary VALUE ...] [--clear-canary VALUE ...]
                    [--also FILE ...]
    softrelay policy show
    softrelay policy render --lang en|de [--format markdown|html] [--output FILE]
    softrelay keys rotate|reseal
    softrelay db migrate|status
    softrelay crashes list|show EVENT_ID|export|stats [--project P] [--output FILE]
    softrelay dsr export|rectify|erase|restrict|unrestrict --user U --serial S
    softrelay billing --month YYYY-MM [--format table|csv|json] [--suppress-below N]
    softrelay billing close --month YYYY-MM [--now ISO-8601]
    softrelay simulate [--embedded | --target URL] [--phones N] [--duration S] ...

Every command takes --config FILE (or SOFTRELAY_CONFIG) and --data-dir DIR, before or
after its name (`softrelay --config F policy show`); `softrelay --version`. A
configuration or policy that cannot work ends the command with exit status 2 and one
line naming the file and the key. A command reads only the secrets it uses (see
`_secrets_used`): `policy render` needs no PBX secret, `serve` reads every one at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from console.settings import ConsoleSettings
from crashreports.commands import add_crashes_parser, crashes_command
from dsr.cli import add_dsr_parser, dsr_command
from dsr.service import check_dsr
from privacy.audit import (
    audit,
    check_canaries,
    format_hits,
    format_report,
    scan_for_canaries,
    scan_sealed,
)
from privacy.backend import StorageError
from privacy.clock import Clock, ManualClock, SystemClock, iso, parse_instant
from privacy.database import describe
from privacy.keys import Keyring, embedded_keyring_path, load_keyring, write_keyring
from privacy.logs import LogSet, setup_logging
from privacy.migrations import MIGRATE_COMMAND, SCHEMA_VERSION
from privacy.notice import FORMATS, policy_table, render_notice
from privacy.policy import Policy, load_policy
from privacy.retention import Sweeper
from privacy.store import Store
from proxy.oauth import stand_in_notice
from softrelay.allocator import pin_mmap_threshold
from softrelay.app import CONSOLE, SERVICES, SIP_TRANSPORTS, STAND_INS, Services, build_app
from softrelay.config import (
    SECRET_SECTIONS,
    Config,
    SecretSection,
    config_path,
    load_config,
    with_overrides,
)
from softrelay.metrics import METRICS, MetricsSettings, metrics_app
from softrelay.simulate import add_simulate_parser, simulate_command
from softrelay.workers import (
    Lifeline,
    Supervisor,
    WorkerSpec,
    check_workers,
    child_environment,
    for_worker,
    for_worker_cluster,
    reserve_ports,
    whole_lines,
    worker_command,
)
from tomlsections.reader import ConfigError
from usage.cli import add_billing_parser, billing
from webapi.connections import HTTP_GUARD, GuardedSite, HttpGuard, HttpLimits

log = logging.getLogger("softrelay.proxy")


@dataclass(frozen=True, slots=True)
class Runtime:
    """What every command starts from: configuration, policy, clock, logs."""

    config: Config
    policy: Policy
    clock: Clock
    logs: LogSet

    def keyring(self) -> Keyring:
        return load_keyring(self.config.keyring, self.config.data_dir)

    async def open_store(self) -> Store:
        config = self.config
        return await Store.create(
            self.policy, self.keyring(), config.data_dir, self.clock, config.store
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = with_overrides(
            load_config(config_path(args.config), read_secrets=False),
            data_dir=args.data_dir,
            http_port=getattr(args, "http_port", None),
            sip_port=getattr(args, "sip_port", None),
        )
        config.read_secrets(_secrets_used(args))
        policy = load_policy(config.profile, config.policy_override)
        check_dsr(config.dsr, policy, str(config.source or "<defaults>"))
        if args.command == "policy":
            return _policy(args, config, policy)
        if args.command == "simulate":  # its own world: no logs or data of this config
            return simulate_command(args, config)
    except ConfigError as exc:
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2
    # Owner-only from the start: everything below it is data of the policy.
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = getattr(args, "now", None)
    clock: Clock = ManualClock(parse_instant(now)) if now else SystemClock()
    logs = setup_logging(
        policy,
        config.data_dir,
        clock,
        level=getattr(logging, config.log_level.upper()),
        console=config.log_console and args.command == "serve",
    )
    runtime = Runtime(config, policy, clock, logs)
    try:
        serve = _supervise if args.command == "serve" and args.workers > 1 else _serve
        handler = {
            "serve": serve,
            "sweep": _sweep,
            "audit": _audit,
            "keys": _keys,
            "crashes": _crashes,
            "dsr": _dsr,
            "billing": _billing,
            "db": _db,
        }[args.command]
        # uvloop: 1,100 -> 1,500 relayed calls/s on 2 cores (bench/relay.py); the relay
        # spends most of its time in the loop's datagram and socket paths.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(handler(runtime, args))
    except ConfigError as exc:
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, a data directory we may not write
        print(f"softrelay: cannot start: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # a schema to migrate, a database gone: what to do next
        print(f"softrelay: {exc}", file=sys.stderr)
        return 2
    finally:
        logs.close()


def _secrets_used(args: argparse.Namespace) -> tuple[SecretSection, ...]:
    """The sections holding secrets that a command uses, read before anything starts;
    it reads no other. The keyring is read apart, when a command opens the store;
    `simulate --target` reads [sip] and [usage] once it knows it plays against a server."""
    if args.command == "serve":
        return SECRET_SECTIONS
    # The store's DSN, for every command that opens the store.
    store: tuple[SecretSection, ...] = () if _opens_no_store(args) else ("store",)
    if args.command == "billing":
        return (*store, "usage")
    if args.command == "crashes" and getattr(args, "metrics_url", None):
        return (*store, "metrics_token")  # `crashes stats --metrics-url` scrapes with it
    return store


def _opens_no_store(args: argparse.Namespace) -> bool:
    return args.command in ("policy", "simulate") or (
        args.command == "keys" and args.action == "rotate"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _version() -> str:
    try:
        return f"softrelay {version('softrelay')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "softrelay (not installed)"


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    """--config and --data-dir, on the main parser and on every command's: a command's
    parser leaves them out of the result when not given (SUPPRESS), or its default
    would overwrite what was given before the command's name."""
    parser.add_argument(
        "--config",
        default=default,
        help="configuration file (default: SOFTRELAY_CONFIG or the shipped sample)",
    )
    parser.add_argument(
        "--data-dir",
        default=default,
        help="directory of every stored byte (default: data_dir of the config)",
    )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="softrelay", description="A privacy-aware backend for softphones."
    )
    parser.add_argument("--version", action="version", version=_version())
    _global_options(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the server")
    serve.add_argument("--http-port", type=int, help="HTTP port (0 picks a free one)")
    serve.add_argument("--sip-port", type=int, help="SIP port (0 picks a free one)")
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="N processes sharing the ports, each a node of the cluster (needs [cluster];"
        " softrelay/workers.py)",
    )
    # What the supervisor of --workers tells each worker (softrelay.workers.WorkerSpec).
    serve.add_argument("--worker", help=argparse.SUPPRESS)

    sweep = sub.add_parser(
        "sweep", parents=[common], help="delete what the policy says has expired"
    )
    sweep.add_argument("--now", help="sweep as if it were this ISO-8601 time")

    aud = sub.add_parser("audit", parents=[common], help="check stored data against the policy")
    aud.add_argument("--now", help="audit as if it were this ISO-8601 time")
    aud.add_argument(
        "--canary",
        action="append",
        default=[],
        metavar="VALUE",
        help="fail if VALUE is found in any file under the data directory, or inside an"
        " encrypted field of the store (decrypted with the keyring)",
    )
    aud.add_argument(
        "--clear-canary",
        action="append",
        default=[],
        metavar="VALUE",
        help="fail if VALUE is found in the clear in any file: for a value the policy"
        " keeps, encrypted (an address, a push token), which decryption finds by design",
    )
    aud.add_argument(
        "--also",
        action="extend",
        nargs="+",
        default=[],
        type=Path,
        metavar="FILE",
        help="search these files (or directories) for the canaries too: the service's"
        " captured stdout and stderr, say",
    )

    pol = sub.add_parser("policy", help="show the policy or render the privacy notice")
    pol_sub = pol.add_subparsers(dest="action", required=True)
    pol_sub.add_parser("show", parents=[common], help="print the effective policy as a table")
    render = pol_sub.add_parser(
        "render", parents=[common], help="write the privacy notice (Markdown or HTML)"
    )
    render.add_argument("--lang", choices=("en", "de"), default="en")
    render.add_argument(
        "--format",
        choices=FORMATS,
        default="markdown",
        help="markdown, or html: one self-contained page that loads nothing from outside,"
        " for an app to show as its EULA at first launch",
    )
    render.add_argument("--output", help="file to write (default: standard output)")

    add_billing_parser(sub, common)
    add_dsr_parser(sub, common)

    add_crashes_parser(sub, common)
    add_simulate_parser(sub, common)

    db = sub.add_parser("db", help="the database's schema")
    db_sub = db.add_subparsers(dest="action", required=True)
    db_sub.add_parser(
        "migrate",
        parents=[common],
        help="bring the database to this softrelay's schema and create the tables the"
        " policy declares (PostgreSQL: before the first start and after each upgrade)",
    )
    db_sub.add_parser(
        "status", parents=[common], help="the schema's version and what the database lacks"
    )

    keys = sub.add_parser("keys", help="manage the keyring")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    keys_sub.add_parser("rotate", parents=[common], help="add a new active encryption key")
    keys_sub.add_parser(
        "reseal",
        parents=[common],
        help="rewrite every stored ciphertext under the active key, bound to its record"
        " (after a rotation, once every instance runs with the new keyring)",
    )
    return parser


def _policy(args: argparse.Namespace, config: Config, policy: Policy) -> int:
    if args.action == "show":
        print(policy_table(policy))
        return 0
    notice = render_notice(policy, config.controller, args.lang, args.format)
    if args.output:
        Path(args.output).write_text(notice, encoding="utf-8")
    else:
        print(notice, end="")  # the notice ends in its own newline; stdout equals the file
    return 0


async def _serve(runtime: Runtime, args: argparse.Namespace) -> int:
    # Each worker runs this too, before any connection: after connections have come and
    # gone, uvloop's 256 KiB TLS read buffers stay fresh mmaps (softrelay/allocator.py).
    pin_mmap_threshold()
    config = runtime.config
    # A worker of `serve --workers N`: the shared ports, its own metrics port, its name.
    worker = WorkerSpec.decode(args.worker) if args.worker else None
    name = "softrelay" if worker is None else f"softrelay worker {worker.index}"
    listen, sip, cluster = config.listen, config.sip, config.cluster
    if worker is not None:
        whole_lines()
        listen, sip = for_worker(listen, sip, worker)
        if cluster is not None:
            cluster = for_worker_cluster(cluster, worker)
    services = Services(
        runtime.policy,
        runtime.keyring(),
        config.data_dir,
        runtime.clock,
        config.sweep_interval,
        config.push,
        sip,
        (listen.sip_host, listen.sip_port),
        crash=config.crashreports,
        provisioning=config.provisioning,
        oauth=config.oauth,
        usage=config.usage,
        dsr=config.dsr,
        http=config.http,
        metrics=MetricsSettings(config.metrics_token, listen.metrics),
        store=config.store,
        cluster=cluster,
        sipis=config.sipis,
        contacts=config.contacts,
        # The console is one process's: the single one, or the supervisor's first worker.
        console=config.console
        if worker is None or worker.index == 0
        else ConsoleSettings(enabled=False),
    )
    # Handlers first: a SIGTERM during start-up must stop cleanly too, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The supervisor's end closing (it stopped or died) stops a worker as SIGTERM does.
    lifeline = Lifeline(worker.fd, stop.set) if worker is not None else None
    app = build_app(services)
    # No access log: aiohttp's would write every client's full IP address. Its
    # keep-alive timeout is the idle timeout; the guard adds the rest (webapi/connections.py).
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, keepalive_timeout=config.http.idle_timeout
    )
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    try:
        site = GuardedSite(
            runner,
            listen.http_host,
            listen.http_port,
            app[HTTP_GUARD],
            reuse_port=worker is not None,
        )
        await site.start()
        served = "healthz" if listen.metrics else "healthz, metrics"
        for address in runner.addresses:
            host, port = address[0], address[1]
            print(f"{name}: http://{host}:{port} ({served})", flush=True)
            log.info("listening", extra={"fields": {"listen": f"http://{host}:{port}"}})
        if listen.metrics is not None:
            metrics_runner = await _serve_metrics(app, listen.metrics, config.http, name)
        _print_push(runner.app, name)
        if oauth_notice := stand_in_notice(runner.app):
            print(oauth_notice, flush=True)
        for kind, (host, port) in runner.app[SIP_TRANSPORTS].addresses:
            print(f"{name}: sip {kind} {host}:{port}", flush=True)
        if (console := runner.app.get(CONSOLE)) is not None:
            for host, port in console.addresses:
                print(f"{name}: console {console.scheme}://{host}:{port}/", flush=True)
        print(
            f"{name}: profile {runtime.policy.profile}, data in {config.data_dir}/; "
            "SIGTERM or Ctrl-C stops",
            flush=True,
        )
        if lifeline is not None:
            lifeline.ready()
        await stop.wait()
        print(f"{name}: stopping", flush=True)
    finally:
        if lifeline is not None:
            lifeline.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        # Stops accepting, lets requests in flight finish, then runs the cleanup contexts
        # in reverse: the sweeper stops before the store closes.
        await runner.cleanup()
    log.info("stopped")
    return 0


async def _supervise(runtime: Runtime, args: argparse.Namespace) -> int:
    """`serve --workers N`: the supervisor of softrelay/workers.py."""
    config = runtime.config
    source = str(config.source or "<defaults>")
    cluster = config.cluster
    refusal = check_workers(args.workers, cluster, config.listen, source)
    if refusal is not None or cluster is None:
        print(f"softrelay: {refusal}", file=sys.stderr)
        return 2
    whole_lines()
    # Once, before N processes race to them: the keyring generated under data_dir, the
    # SQLite schema made, a PostgreSQL schema checked (its error is one line, here).
    store = await runtime.open_store()
    await store.close()
    listen = config.listen
    metrics = listen.metrics
    reservation = reserve_ports(
        (listen.http_host, listen.http_port),
        (listen.sip_host, listen.sip_port),
        config.sip.tls_port,
        metrics[1] if metrics is not None else None,
        cluster.internal_listen[1],
        cluster.node_id,
    )
    try:
        config_source = str(config.source) if config.source is not None else None
        data_dir = str(config.data_dir)
        supervisor = Supervisor(
            reservation.ports,
            args.workers,
            lambda spec: worker_command(spec, config_source, data_dir),
            env=child_environment(config_source),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.stop)
        ports = reservation.ports
        print(
            f"softrelay: http://{listen.http_host}:{ports.http} (healthz; metrics on each"
            f" worker's port), {args.workers} workers; SIGTERM or Ctrl-C stops",
            flush=True,
        )
        print(f"softrelay: sip udp+tcp {listen.sip_host}:{ports.sip}", flush=True)
        return await supervisor.run()
    finally:
        reservation.close()


async def _serve_metrics(
    app: web.Application, listen: tuple[str, int], limits: HttpLimits, name: str
) -> web.AppRunner:
    """/metrics on a listener of its own, with the same connection limits."""
    metrics = metrics_app(app[METRICS])
    guard = HttpGuard(limits, app[SERVICES].clock, CollectorRegistry())
    metrics.middlewares.insert(0, guard.middleware)
    metrics.cleanup_ctx.append(guard.context)
    runner = web.AppRunner(
        metrics, access_log=None, handle_signals=False, keepalive_timeout=limits.idle_timeout
    )
    await runner.setup()
    await GuardedSite(runner, listen[0], listen[1], guard).start()
    for address in runner.addresses:
        print(f"{name}: http://{address[0]}:{address[1]}/metrics (metrics)", flush=True)
    return runner


def _print_push(app: web.Application, name: str) -> None:
    stand_ins = app.get(STAND_INS)
    if stand_ins is None:
        names = ", ".join(a.app_id for a in app[SERVICES].push.apps)
        print(f"{name}: push to Apple and Google for {names}", flush=True)
        return
    apns = stand_ins.apns.endpoint()
    print(
        f"{name}: push stand-ins in-process (no credentials configured): "
        f"APNs https://{apns.host}:{apns.port}, FCM {stand_ins.fcm.base_url}, "
        f"app {stand_ins.apps[0].app_id}",
        flush=True,
    )


async def _sweep(runtime: Runtime, args: argparse.Namespace) -> int:
    store = await runtime.open_store()
    try:
        # Whenever asked (no interval), but not beside another process's sweep.
        runs = await Sweeper(store, runtime.config.data_dir).run_if_due(None)
    finally:
        await store.close()
    if runs is None:
        print("softrelay: sweep skipped: another process is sweeping now", file=sys.stderr)
        return 1
    print(f"swept at {iso(runtime.clock.now())}")
    for run in runs:
        print(f"  {run.category:<20} cutoff {iso(run.cutoff)}  deleted {run.deleted}")
    return 0


async def _audit(runtime: Runtime, args: argparse.Namespace) -> int:
    data_dir = runtime.config.data_dir
    canaries: list[str] = args.canary
    in_files = [*canaries, *args.clear_canary]
    also: list[Path] = args.also
    try:
        check_canaries(in_files)
    except ValueError as exc:
        print(f"softrelay: --canary: {exc}", file=sys.stderr)
        return 2
    if also and not in_files:
        print("softrelay: --also: give the values to look for with --canary", file=sys.stderr)
        return 2
    if missing := [str(path) for path in also if not path.exists()]:
        print(f"softrelay: --also: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    store = await runtime.open_store()
    try:
        verdicts = await audit(store, data_dir)
        sealed = await scan_sealed(store, canaries) if canaries else None
    finally:
        await store.close()
    print(format_report(verdicts))
    failed = any(v.verdict == "violation" for v in verdicts)
    if in_files:
        # After the store closed: its write-ahead log is folded into the file by then.
        hits = await asyncio.to_thread(scan_for_canaries, data_dir, in_files, also=also)
        print(format_hits(hits, sealed))
        failed = failed or bool(hits)
    if sealed is not None:
        failed = failed or bool(sealed.hits) or bool(sealed.unopened)
    return 1 if failed else 0


async def _keys(runtime: Runtime, args: argparse.Namespace) -> int:
    if args.action == "reseal":
        count = await _with_store(runtime, lambda store: store.reseal())
        print(
            f"softrelay: {count} records rewritten; keys older than the active one are"
            " no longer needed once backups made before now have expired"
        )
        return 0
    source = runtime.config.keyring
    if source.startswith("env:"):
        print(
            "softrelay: the keyring comes from the environment; rotate it where it is kept",
            file=sys.stderr,
        )
        return 2
    path = (
        Path(source[5:])
        if source.startswith("file:")
        else embedded_keyring_path(runtime.config.data_dir)
    )
    rotated = runtime.keyring().rotated()
    write_keyring(rotated, path)
    print(f"softrelay: key {rotated.active} is now active in {path}; older keys still decrypt")
    # Not resealed here: an instance still running with the old keyring could not read
    # what the new key wrote. `keys reseal` once all run with this keyring.
    print("softrelay: restart every instance, then run `softrelay keys reseal`")
    return 0


async def _db(runtime: Runtime, args: argparse.Namespace) -> int:
    config = runtime.config
    where = describe(config.store, config.data_dir)
    if args.action == "migrate":
        done = await Store.migrate(runtime.policy, config.data_dir, config.store)
        if not done:
            print(f"softrelay: {where} is up to date (schema version {SCHEMA_VERSION})")
        for step in done:
            print(f"softrelay: {where}: {step}")
        return 0
    version, missing = await Store.schema_status(runtime.policy, config.data_dir, config.store)
    print(f"softrelay: {where}: schema version {version}, this softrelay needs {SCHEMA_VERSION}")
    for thing in missing:
        print(f"softrelay: {where}: {thing} is missing (the policy declares it)")
    if version > SCHEMA_VERSION:
        print("softrelay: written by a newer softrelay: upgrade softrelay")
        return 1
    if version < SCHEMA_VERSION or missing:
        print(f"softrelay: run `{MIGRATE_COMMAND}`")
        return 1
    print("softrelay: up to date")
    return 0


async def _dsr(runtime: Runtime, args: argparse.Namespace) -> int:
    return await _with_store(runtime, lambda store: dsr_command(store, runtime.config.dsr, args))


async def _billing(runtime: Runtime, args: argparse.Namespace) -> int:
    return await _with_store(runtime, lambda store: billing(store, runtime.config.usage, args))


async def _crashes(runtime: Runtime, args: argparse.Namespace) -> int:
    # Only `crashes stats --metrics-url` scrapes /metrics, with the token.
    token = runtime.config.metrics_token if getattr(args, "metrics_url", None) else ""
    return await _with_store(runtime, lambda store: crashes_command(store, args, token))


async def _with_store(runtime: Runtime, command: Callable[[Store], Awaitable[int]]) -> int:
    """Run a command on the store, closed after it whatever happens."""
    store = await runtime.open_store()
    try:
        return await command(store)
    finally:
        await store.close()


if __name__ == "__main__":
    sys.exit(main())
