"""`make run` in one terminal and `softrelay simulate` in another, as the README says.

The sample configuration (with its ports moved to free ones) is copied to a directory
where `serve` runs as `make run` starts it, its demo keys (PBX secret, usage tenant,
crash project) written as `make run` writes them; then the plain `softrelay simulate`,
no --target, from the same directory, must find that server, play its demo PBX and get
its pushes through the delivery feed.
It runs at speed `inf` (a stepped pace: no wait costs real time, the events in order),
so the summary is checked exactly against the events the seed drew.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson

from tests.demo import demo_config, softrelay
from tests.limits import LONGEST_WAIT

STEP_TIMEOUT = 15.0


def _sample_config(workdir: Path) -> tuple[int, int]:
    """The sample in `workdir` with free ports and the demo keys `make run` writes."""
    demo = demo_config(workdir)
    return demo.http_port, demo.sip_port


async def test_plain_simulate_plays_against_the_server_make_run_started(tmp_path: Path) -> None:
    http_port, _ = _sample_config(tmp_path)
    serve = await softrelay(tmp_path, "serve")
    assert serve.stdout is not None
    assert serve.stderr is not None
    printed: list[str] = []
    try:
        while not printed or not printed[-1].startswith("softrelay: profile"):
            line = (await asyncio.wait_for(serve.stdout.readline(), STEP_TIMEOUT)).decode()
            assert line, f"serve ended:\n{''.join(printed)}"
            printed.append(line)
        assert f"softrelay: http://127.0.0.1:{http_port} (healthz, metrics)\n" in printed

        # Users answer or decline: at speed inf a call left ringing would ring out only
        # at its real-time bound.
        (tmp_path / "answers.toml").write_text("[answers]\nanswer = 3\ndecline = 1\n")
        sim = await softrelay(
            tmp_path,
            "simulate",
            "--scenario",
            "answers.toml",
            "--phones",
            "20",
            "--duration",
            "20",
            "--speed",
            "inf",
            "--call-rate",
            "1.5",
            "--seed",
            "11",
            "--no-live",
            "--json",
            "summary.json",
        )
        out, err = await asyncio.wait_for(sim.communicate(), LONGEST_WAIT)
        assert sim.returncode == 0, err.decode()
    finally:
        if serve.returncode is None:
            serve.send_signal(signal.SIGTERM)
        _, serve_err = await asyncio.wait_for(serve.communicate(), STEP_TIMEOUT)
    assert serve.returncode == 0, serve_err.decode()[-3000:]

    assert b"starting one in this process" not in err, "it found the served relay"
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["registrations"] == {"ok": 20, "failed": {}}
    calls, events = summary["calls"], summary["events"]
    # Every call the seed drew was placed (or found no one free), and ended one way.
    assert calls["attempted"] + calls["unplaced"] == events["pbx_call"] + events["phone_call"]
    assert calls["connected"] + sum(calls["failed"].values()) == calls["attempted"]
    assert set(calls["failed"]) <= {"603 Decline"}, calls
    assert calls["woken"] > 0, "calls to sleeping phones were woken across processes"
    assert summary["wake_latency"]["count"] == calls["woken"]
    assert summary["pushes"] == {"delivered": calls["woken"]}, "one push per woken call"
    assert summary["skipped_events"] == 0
    assert summary["crash_reports"]["errors"] == 0
    assert b"calls" in out, "the summary table was printed"
