"""`softrelay simulate --target A,B`: the phones and PBXs spread over several nodes, and
figures per node in the summary.

Two plain serves (no [cluster]) are two relays that know nothing of each other, so the
run places each phone on its PBX's node (`--placement pbx`, the default) and every call
stays on one node; calls across nodes (`--placement spread`) need a cluster that
forwards between its nodes: two serves on one Redis."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from mockphone.simulate import SimulationError
from softrelay.simulate import parse_targets
from tests.limits import LONGEST_WAIT
from tests.peers import STARTUP_TIMEOUT, spawn_serve

SERIALS = ("9000001", "9000002")


def test_targets_repeated_or_comma_separated_each_with_its_sip_port() -> None:
    nodes = parse_targets(
        ["http://127.0.0.1:8081?sip=5061,http://127.0.0.2:8082/", "http://localhost"], 5060
    )
    assert [(n.name, n.address.host, n.address.sip_port, n.metrics_url) for n in nodes] == [
        ("127.0.0.1:8081", "127.0.0.1", 5061, "http://127.0.0.1:8081/metrics"),
        ("127.0.0.2:8082", "127.0.0.2", 5060, "http://127.0.0.2:8082/metrics"),
        ("localhost:80", "localhost", 5060, "http://localhost:80/metrics"),
    ]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("https://127.0.0.1:8081", "--target https://127.0.0.1:8081: expected http://HOST"),
        ("http://127.0.0.1:8081?sip=0", "--target http://127.0.0.1:8081?sip=0: a port must be"),
        ("http://a:1,http://a:1/", "--target http://a:1/: a:1 is given twice"),
    ],
)
def test_a_bad_target_names_itself(value: str, error: str) -> None:
    with pytest.raises(SimulationError) as caught:
        parse_targets([value], 5060)
    assert str(caught.value).startswith(error)


def _config(tmp_path: Path, redis_url: str | None = None) -> Path:
    """Both PBXs, and with `redis_url` a [cluster] (each node's id its own default)."""
    text = '[sip]\ndomain = "relay.test"\n\n'
    if redis_url is not None:
        (tmp_path / "redis.url").write_text(redis_url + "\n", encoding="utf-8")
        (tmp_path / "cluster.secret").write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
        text += (
            f'[cluster]\nredis = "file:{tmp_path / "redis.url"}"\n'
            f'secret = "file:{tmp_path / "cluster.secret"}"\n\n'
        )
    for serial in SERIALS:
        secret = tmp_path / f"{serial}.secret"
        secret.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
        text += f'[[sip.pbx]]\nserial = "{serial}"\nsecret = "file:{secret}"\n\n'
    config = tmp_path / "softrelay.toml"
    config.write_text(text, encoding="utf-8")
    return config


async def _serve(config: Path, data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    """A plain serve; its --target value (HTTP address and SIP TCP port)."""
    proc = await spawn_serve(data_dir, "--config", str(config))
    assert proc.stdout is not None
    http = sip = None
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while (line := (await proc.stdout.readline()).decode()) and not line.startswith(
            "softrelay: profile"
        ):
            if match := re.match(r"softrelay: (http://127\.0\.0\.1:\d+) \(", line):
                http = match.group(1)
            if match := re.match(r"softrelay: sip tcp 127\.0\.0\.1:(\d+)$", line.strip()):
                sip = match.group(1)
    assert http, "serve printed its HTTP address"
    assert sip, "serve printed its SIP TCP port"
    return proc, f"{http}?sip={sip}"


async def _simulate(
    tmp_path: Path, config: Path, *options: str
) -> tuple[dict[str, Any], list[str], bytes]:
    """Two serves of `config`, and `simulate` against both at speed inf (answering or
    declining users: a call left ringing would ring out only at its real-time bound);
    the summary, the node names, and what simulate printed."""
    serves = [await _serve(config, tmp_path / f"var{i}") for i in (0, 1)]
    try:
        targets = ",".join(target for _, target in serves)
        (tmp_path / "answers.toml").write_text("[answers]\nanswer = 3\ndecline = 1\n")
        sim = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "softrelay.cli",
            "simulate",
            *("--config", str(config), "--target", targets, "--scenario", "answers.toml"),
            *("--pbxs", "2", "--duration", "20", "--speed", "inf", "--seed", "11"),
            *("--no-live", "--json", "summary.json", *options),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SOFTRELAY_CONFIG": ""},
        )
        out, err = await asyncio.wait_for(sim.communicate(), LONGEST_WAIT)
        assert sim.returncode == 0, err.decode()
    finally:
        for proc, _ in serves:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    names = [target.removeprefix("http://").split("?")[0] for _, target in serves]
    return summary, names, out


def _every_call_accounted(summary: dict[str, Any]) -> None:
    nodes, calls = summary["nodes"], summary["calls"]
    for node in nodes.values():
        node_calls = node["calls"]
        assert (
            node_calls["connected"] + sum(node_calls["failed"].values())
            == (node_calls["attempted"])
        )
        assert node["wake_latency"]["count"] == node_calls["woken"]
    for key in ("attempted", "connected", "woken"):
        assert sum(node["calls"][key] for node in nodes.values()) == calls[key]
    assert all(node["calls"]["attempted"] > 0 for node in nodes.values()), nodes
    assert set(calls["failed"]) <= {"603 Decline"}, calls
    assert calls["woken"] > 0
    # Every call to a sleeping phone was delivered after one push, on whichever node.
    assert summary["pushes"] == {"delivered": calls["woken"]}


async def test_simulate_spreads_over_two_nodes_and_counts_each(tmp_path: Path) -> None:
    """Two plain serves, a PBX on each and each phone on its PBX's node: every phone
    registers, and each node's figures are its own (its phones, its calls, and the
    pushes its own counters show, one per call that woke a phone there)."""
    config = _config(tmp_path)
    summary, names, out = await _simulate(tmp_path, config, "--phones", "20", "--call-rate", "1.5")
    nodes = summary["nodes"]
    assert list(nodes) == names
    for node in nodes.values():
        assert (node["phones"], node["phones_pbx_elsewhere"], node["pbxs"]) == (10, 0, 1)
        assert node["registrations"] == {"ok": 10, "failed": {}}
        woken = node["calls"]["woken"]
        assert node["pushes"] == ({"delivered": woken} if woken else {})
    _every_call_accounted(summary)
    assert b"per node" in out, "the summary printed the per-node table"


async def test_simulate_200_phones_spread_over_two_cluster_nodes(
    tmp_path: Path, redis_url: str
) -> None:
    """Two serves of one cluster, half of each node's phones with their PBX on the other
    node: all 200 register through the other node's PBX link, and every call to a
    sleeping phone is delivered (the nodes forward to each other)."""
    config = _config(tmp_path, redis_url)
    summary, names, _ = await _simulate(
        tmp_path, config, "--phones", "200", "--call-rate", "3", "--placement", "spread"
    )
    nodes = summary["nodes"]
    assert list(nodes) == names
    for node in nodes.values():
        assert (node["phones"], node["phones_pbx_elsewhere"], node["pbxs"]) == (100, 50, 1)
        assert node["registrations"] == {"ok": 100, "failed": {}}
    _every_call_accounted(summary)
