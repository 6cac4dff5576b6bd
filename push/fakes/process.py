"""The APNs and FCM stand-ins in a process of their own, as Apple and Google are.

    python -m push.fakes.process --app com.example.softphone [--extra-keys 1]

In `serve`'s embedded mode the stand-ins share the relay's event loop and CPU, so what
they cost (TLS, HTTP/2, an ES256 check per APNs request) is counted as the relay's.
Here they run apart: the child starts both on loopback (ports 0), then writes one JSON
line on stdout, where they are and the throwaway credentials that work with them:

    {"apns": {"host", "port", "ca_pem"}, "fcm": {"base_url"},
     "apps": [{"app_id", "team_id", "key_id", "key_pem", "project_id", "account"}],
     "extra_keys": [{"team_id", "key_id", "key_pem"}]}

(`extra_keys`: more APNs keys for the first app's topic, e.g. for a second client, which
Apple would refuse a second token for one key within 20 minutes). Then one line per push
accepted, `<service> <token> <CLOCK_MONOTONIC seconds>`, the lines of one loop turn in
one write. The monotonic clock is the machine's, so the parent can subtract its own
readings. The child ends when its stdin closes (the parent went) or on SIGTERM.

With `--profile PATH` the child runs cProfile from SIGUSR1 to SIGUSR2 and writes PATH at
SIGUSR2, and says so on stdout (`profile started 0`, `profile written 0`), so a bench can
profile the stand-ins over the part of its run it measures (`StandInsProcess.profile`).

`StandInsProcess` is the parent's side. Nothing here is for production: the keys are
made for the run and printed to the parent's pipe.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from push.apps import ApnsCredentials, ApnsEndpoint, AppCredentials, FcmCredentials, FcmEndpoint
from push.fakes.apns import ApnsKeyGrant, FakeApns
from push.fakes.certs import ApnsSigningKey, ThrowawayCa
from push.fakes.fcm import FakeFcm
from push.fakes.script import Deliveries, Delivery

ROOT = Path(__file__).resolve().parents[2]  # the repository, where `push` is importable
START_TIMEOUT = 30.0  # s for the child to report its stand-ins (RSA keys take a moment)
STOP_TIMEOUT = 10.0  # s for the child to end once its stdin closed, before SIGKILL
# (service, token, CLOCK_MONOTONIC seconds at which the stand-in accepted the push)
Listener = Callable[[str, str, float], None]


# --- the child ----------------------------------------------------------------------


class _Announcer:
    """Writes accepted pushes to stdout, once per loop turn (a write per push would
    cost the stand-ins a syscall each)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def __call__(self, delivery: Delivery) -> None:
        if not self._lines:
            asyncio.get_running_loop().call_soon(self._flush)
        self._lines.append(f"{delivery.service} {delivery.token} {time.monotonic():.6f}\n")

    def _flush(self) -> None:
        text, self._lines = "".join(self._lines), []
        sys.stdout.write(text)
        sys.stdout.flush()


class _UntilClosed(asyncio.Protocol):
    def __init__(self, closed: asyncio.Event) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set()


def _project(app_id: str) -> str:
    return app_id.lower().replace(".", "-").replace("_", "-")[:30]


def _profile_on_signals(loop: asyncio.AbstractEventLoop, path: Path) -> None:
    profile = cProfile.Profile()

    def say(what: str) -> None:
        sys.stdout.write(f"profile {what} 0\n")
        sys.stdout.flush()

    def started() -> None:
        profile.enable()
        say("started")

    def written() -> None:
        profile.disable()
        profile.dump_stats(path)
        profile.clear()
        say("written")

    loop.add_signal_handler(signal.SIGUSR1, started)
    loop.add_signal_handler(signal.SIGUSR2, written)


async def _serve(app_ids: Sequence[str], extra_keys: int, profile: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if profile is not None:
        _profile_on_signals(loop, profile)
    with tempfile.TemporaryDirectory(prefix="softrelay-stand-ins-") as tmp:
        ca = ThrowawayCa.create(Path(tmp))
        keys = {app_id: ApnsSigningKey.generate() for app_id in app_ids}
        extra = [ApnsSigningKey.generate() for _ in range(extra_keys)]
        grants = [ApnsKeyGrant.of(key, app_id) for app_id, key in keys.items()]
        grants += [ApnsKeyGrant.of(key, app_ids[0]) for key in extra]
        deliveries = Deliveries()
        deliveries.subscribe(_Announcer())
        apns = await FakeApns.start(ca, keys=grants, deliveries=deliveries)
        fcm = await FakeFcm.start(deliveries=deliveries)
        try:
            apps = []
            for app_id, key in keys.items():
                account = fcm.new_service_account(_project(app_id))
                apps.append(
                    {
                        "app_id": app_id,
                        "team_id": key.team_id,
                        "key_id": key.key_id,
                        "key_pem": key.key_pem,
                        "project_id": _project(app_id),
                        "account": account,
                    }
                )
            started = {
                "apns": {"host": apns.host, "port": apns.port, "ca_pem": ca.cert_pem.decode()},
                "fcm": {"base_url": fcm.base_url},
                "apps": apps,
                "extra_keys": [
                    {"team_id": k.team_id, "key_id": k.key_id, "key_pem": k.key_pem} for k in extra
                ],
            }
            sys.stdout.write(json.dumps(started) + "\n")
            sys.stdout.flush()
            # stdin's end (the parent closed it or went away) stops us too.
            await loop.connect_read_pipe(lambda: _UntilClosed(stop), sys.stdin)
            await stop.wait()
        finally:
            await apns.stop()
            await fcm.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--app", action="append", required=True, help="an app id (repeatable)")
    parser.add_argument("--extra-keys", type=int, default=0, help="more APNs keys, first app")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--profile", type=Path, help="cProfile from SIGUSR1 to SIGUSR2, written here"
    )
    args = parser.parse_args(argv)
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(args.app, max(0, args.extra_keys), args.profile))
    return 0


# --- the parent ---------------------------------------------------------------------


@dataclass
class StandInsProcess:
    """The child, seen from the parent: its endpoints and credentials, and a reader of
    its accepted pushes. `start()` it, `stop()` it (also on error: it kills the child
    that does not end in time)."""

    proc: asyncio.subprocess.Process
    apps: tuple[AppCredentials, ...]
    apns_endpoint: ApnsEndpoint
    fcm_endpoint: FcmEndpoint
    extra_keys: tuple[ApnsSigningKey, ...]
    _listeners: list[Listener] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _profile_said: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(
        cls,
        app_ids: Sequence[str],
        *,
        extra_keys: int = 0,
        uvloop: bool = True,
        profile: Path | None = None,
    ) -> StandInsProcess:
        """`profile`: where the child writes the cProfile that `profile()` bounds."""
        argv = [sys.executable, "-m", "push.fakes.process", "--extra-keys", str(extra_keys)]
        argv += [part for app_id in app_ids for part in ("--app", app_id)]
        if uvloop:
            argv.append("--uvloop")
        if profile is not None:
            argv += ["--profile", str(profile)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C of the parent is the parent's to handle
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(START_TIMEOUT):
                line = await proc.stdout.readline()
            started = _started(line)
        except BaseException:
            await _end(proc)
            raise
        child = cls(proc, *started)
        child._reader = asyncio.create_task(child._read())
        return child

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for each push accepted from now on; it must not block."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def profile(self, on: bool) -> None:
        """Start the child's cProfile, or stop it and write its file; return once the
        child has (a child started with `profile`)."""
        self._profile_said.clear()
        self.proc.send_signal(signal.SIGUSR1 if on else signal.SIGUSR2)
        async with asyncio.timeout(STOP_TIMEOUT):
            await self._profile_said.wait()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            service, token, at = line.decode().split()
            if service == "profile":
                self._profile_said.set()
                continue
            for listener in list(self._listeners):
                listener(service, token, float(at))

    async def stop(self) -> None:
        await _end(self.proc)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _started(
    line: bytes,
) -> tuple[tuple[AppCredentials, ...], ApnsEndpoint, FcmEndpoint, tuple[ApnsSigningKey, ...]]:
    if not line:
        raise RuntimeError("the stand-ins' process ended before it reported its ports")
    info = json.loads(line)
    apps = tuple(
        AppCredentials(
            a["app_id"],
            apns=ApnsCredentials(a["app_id"], a["team_id"], a["key_id"], a["key_pem"]),
            fcm=FcmCredentials(a["project_id"], a["account"]),
        )
        for a in info["apps"]
    )
    apns = info["apns"]
    context = ssl.create_default_context(cadata=apns["ca_pem"])
    extra = tuple(
        ApnsSigningKey(k["team_id"], k["key_id"], k["key_pem"]) for k in info["extra_keys"]
    )
    return (
        apps,
        ApnsEndpoint(apns["host"], apns["port"], context),
        FcmEndpoint(info["fcm"]["base_url"]),
        extra,
    )


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.close()
    try:
        async with asyncio.timeout(STOP_TIMEOUT):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


if __name__ == "__main__":
    sys.exit(main())
