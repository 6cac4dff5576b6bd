"""softrelay installed as an operator installs it, and run from there.

`python -m build` makes the sdist and the wheel from that sdist (as a release does, and
without a stale build/ of the checkout); the wheel goes with its pinned dependencies
into a fresh venv in a temporary directory, through pip and its configured index. Every
command then runs from that directory, with the checkout neither the working directory
nor on the path: `--version`, `policy show`, `policy render --lang de`, and `serve`,
started on free loopback ports, answering /healthz, stopped by SIGTERM with status 0.

This runs in the normal suite and in CI, never skipped. Building and installing take
longer than a unit test's 60 s (about 30 s with pip's cache warm, more on a cold
machine that downloads every dependency): the module has a timeout of its own, and each
step a bound below it so that a stuck step still reports its output.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import aiohttp
import pytest

from softrelay.cli import main
from tests.peers import STEP_TIMEOUT, http_base

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 120.0  # seconds: sdist and wheel, each in an isolated build env
VENV_TIMEOUT = 60.0
INSTALL_TIMEOUT = 300.0  # the wheel and its dependencies, downloaded when not cached
COMMAND_TIMEOUT = 60.0  # one `softrelay` command of the install
# The steps' bounds and a minute to clean up (see tests/limits.py).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + VENV_TIMEOUT + INSTALL_TIMEOUT + 60)


@dataclass(frozen=True)
class Install:
    work: Path  # the temporary directory every command runs in
    venv: Path
    wheel: Path

    @property
    def softrelay(self) -> str:
        return str(self.venv / "bin" / "softrelay")


def _environment() -> dict[str, str]:
    """This environment without what would point the install at the checkout or at a
    configuration."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SOFTRELAY_CONFIG"}
    return {name: value for name, value in os.environ.items() if name not in drop}


def _run(args: list[str], cwd: Path, timeout: float) -> str:
    """Run a step to its end; its output, or a failure showing the end of it."""
    done = subprocess.run(
        args,
        cwd=cwd,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, (
        f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    work = tmp_path_factory.mktemp("install")
    dist, venv = work / "dist", work / "venv"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], work, BUILD_TIMEOUT)
    (wheel,) = dist.glob("softrelay-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], work, VENV_TIMEOUT)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", str(wheel)], work, INSTALL_TIMEOUT)
    return Install(work, venv, wheel)


def _root_packages() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    roots: list[str] = pyproject["tool"]["importlinter"]["root_packages"]
    return roots


def test_the_wheel_holds_every_package_and_the_shipped_config(installed: Install) -> None:
    """Every package of the checkout (each folder with an __init__.py under the layered
    packages), config/ as `softrelay_config`, and every policy profile."""
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    in_wheel = {str(PurePosixPath(n).parent) for n in names if n.endswith("/__init__.py")}
    in_checkout = {
        init.parent.relative_to(ROOT).as_posix()
        for root in _root_packages()
        for init in (ROOT / root).rglob("__init__.py")
    }
    assert in_wheel == in_checkout | {"softrelay_config"}
    shipped = {n for n in names if n.endswith(".toml")}
    profiles = {
        f"softrelay_config/policy/{p.name}" for p in (ROOT / "config/policy").glob("*.toml")
    }
    assert profiles, "the checkout has no policy profiles"
    assert shipped == {"softrelay_config/softrelay.toml"} | profiles


def test_the_install_runs_its_own_files_not_the_checkouts(installed: Install) -> None:
    python = str(installed.venv / "bin" / "python")
    code = (
        "import softrelay.cli, privacy.policy, softrelay.config\n"
        "print(softrelay.cli.__file__)\n"
        "print(privacy.policy.PROFILES_DIR)\n"
        "print(softrelay.config.DEFAULT_CONFIG)\n"
    )
    paths = [Path(line) for line in _run([python, "-c", code], installed.work, 60).splitlines()]
    assert len(paths) == 3
    for path in paths:
        assert path.is_relative_to(installed.venv), path
        assert path.exists(), path


def test_version(installed: Install) -> None:
    out = _run([installed.softrelay, "--version"], installed.work, COMMAND_TIMEOUT)
    assert out == f"softrelay {version('softrelay')}\n"


def test_policy_show_from_the_shipped_profile(installed: Install) -> None:
    """With no --config the shipped sample is read: its PBX secret (var/demo-pbx.secret,
    which only `make run` writes) is not there, and `policy show` needs none."""
    assert not (installed.work / "var").exists()
    out = _run([installed.softrelay, "policy", "show"], installed.work, COMMAND_TIMEOUT)
    assert out.startswith('Data policy profile "auerproxy"\n')
    source = installed.venv.glob("lib/python*/site-packages/softrelay_config/policy/auerproxy.toml")
    assert f"Source: {next(source)}\n" in out


def test_policy_render_de_is_the_checkouts_notice(
    installed: Install, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The installed command writes the same German notice as the checkout's code does
    from the same sample configuration."""
    out = _run(
        [installed.softrelay, "policy", "render", "--lang", "de"], installed.work, COMMAND_TIMEOUT
    )
    monkeypatch.delenv("SOFTRELAY_CONFIG", raising=False)
    assert main(["policy", "render", "--lang", "de"]) == 0
    assert out == capsys.readouterr().out
    assert out.startswith("# Datenschutz")


async def test_serve_starts_answers_healthz_and_stops_on_sigterm(installed: Install) -> None:
    data = installed.work / "serve-data"
    config = installed.work / "serve.toml"
    config.write_text(
        f'[server]\nhttp_port = 0\nsip_port = 0\ndata_dir = "{data}"\n', encoding="utf-8"
    )
    with (installed.work / "serve.err").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            installed.softrelay,
            "--config",
            str(config),
            "serve",
            cwd=installed.work,
            env=_environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    try:
        base = await http_base(proc)
        async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "status": "ok",
                "dependencies": {"store": {"status": "ok", "backend": "sqlite"}},
            }
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)
        assert status == 0, (installed.work / "serve.err").read_text(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stdout is not None
    assert b"softrelay: stopping" in await proc.stdout.read()
    assert (data / "softrelay.db").is_file()
