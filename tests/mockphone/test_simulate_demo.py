"""The README's two-terminal demo fills the usage and crash panels too: the plain
`softrelay simulate` against the server of the sample configuration (as `make run`
starts it, with the demo tenant's and crash project's keys it writes) pings usage with
the tenant's key and sends crash reports through the stock sentry-sdk. The server
counts both, keeps only the opted-in reports, and keeps them scrubbed: none of the fake
personal data each simulated app put into its report is stored."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from mockphone.phone import PhoneSpec
from mockphone.simulate import crash_details
from tests.demo import STEP_TIMEOUT, run_demo, softrelay

# What `mockphone.simulate.crash_details` puts into every report: its user's e-mail,
# phone number, SIP URI, name, SIP password and IP address.
PERSONAL = {
    "email": re.compile(r"[\w.-]+@example\.com"),
    "phone number": re.compile(r"\+49 30 555\d{5}"),
    "SIP user": re.compile(r"sip:(?:ios|android|desktop)\d+@"),
    "name": re.compile(r"Erika|Mustermann"),
    "SIP password": re.compile(r"pw-[0-9a-f]{16}"),
    "IP address": re.compile(r"203\.0\.113\.\d+"),
}


def test_the_patterns_find_what_each_simulated_app_puts_in_its_report() -> None:
    """The check below could fail: every kind of fake personal data matches its pattern."""
    message, extra = crash_details(PhoneSpec("android7", "pw-0123456789abcdef"), "relay.invalid")
    sent = message + " " + " ".join(extra.values())
    for kind, pattern in PERSONAL.items():
        assert pattern.search(sent), f"crash_details puts no {kind} in a report"


def _sample(metrics: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def _cli(workdir: Path, *args: str) -> bytes:
    """A command of the demo's configuration, run in its directory; what it printed."""
    proc = await softrelay(workdir, *args)
    out, err = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return out


async def test_simulate_against_the_demo_pings_and_reports_scrubbed_crashes(
    tmp_path: Path,
) -> None:
    run = await run_demo(
        tmp_path,
        *("--phones", "8", "--duration", "20", "--seed", "5"),
        *("--call-rate", "0.5", "--crash-rate", "0.6", "--opt-in", "0.5"),
        # Two pings per address: all 8 pass only because each app pings from its own
        # address, as real apps do (the limit counts apps, not the simulate process).
        changes={"\nip_burst = 20\n": "\nip_burst = 2\n"},
    )
    pings, crashes = run.summary["pings"], run.summary["crash_reports"]
    # Every phone registered and pinged once, with the demo tenant's key: accepted.
    assert run.summary["registrations"] == {"ok": 8, "failed": {}}
    assert pings == {"sent": 8, "by_status": {"202": 8}}
    assert _sample(run.metrics, "softrelay_usage_pings_total", outcome="accepted") == 8
    # Every crash event was one report through the SDK; the seed draws both kinds.
    assert crashes["sent"] == run.summary["events"]["crash"]
    assert crashes["errors"] == 0
    assert crashes["opted_in"] > 0
    assert crashes["not_opted_in"] > 0
    stored = _sample(run.metrics, "softrelay_crash_events_total", project="1", outcome="stored")
    dropped = _sample(run.metrics, "softrelay_crash_events_total", project="1", outcome="no_opt_in")
    assert (stored, dropped) == (crashes["opted_in"], crashes["not_opted_in"])
    assert "crash reports" in run.printed
    assert "pings" in run.printed

    # The usage figures: this month's active installs of tenant "demo", one per phone.
    month = time.strftime("%Y-%m", time.gmtime())
    billing = orjson.loads(await _cli(tmp_path, "billing", "--month", month, "--format", "json"))
    assert [(t["tenant"], t["active_installs"]) for t in billing["tenants"]] == [("demo", 8)]

    export = tmp_path / "crashes.jsonl"
    await _cli(tmp_path, "crashes", "export", "--output", str(export))
    reports = [orjson.loads(line) for line in export.read_bytes().splitlines()]
    assert len(reports) == crashes["opted_in"]
    text = export.read_text(encoding="utf-8")
    # The data was sent, and scrubbed: each report's extras are there, as placeholders.
    for report in reports:
        assert report["event"]["extra"] == {
            "sip_uri": "sip:[sip-user]@relay.invalid",
            "caller_name": "[filtered]",
            "password": "[filtered]",
            "last_ip": "[ip]",
            "contact": "[filtered]",
        }
    assert text.count("call to [phone] from [email] failed") >= len(reports)
    for kind, pattern in PERSONAL.items():
        assert not pattern.search(text), f"a stored report holds a {kind}"
