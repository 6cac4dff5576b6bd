"""Issue 14, points 1 and 7: crash scrubbing in linear time, within a CPU budget, and
what it used to let through.

- Every rule, given 1 MiB of a token repeated to hit it (the shapes that made stdlib `re`
  backtrack: `x=1&token...`, `sip:sip:...`, `-----BEGIN ` ...), finishes: the test's own
  timeout catches a regression; nothing here measures time.
- An event over the CPU budget is dropped and counted (metric, `softrelay crashes
  stats`), never stored; the clock of the budget is injected, so the verdict is
  deterministic.
- Free-text credentials, SIP digest credentials, HA1s, secrets in repr'd dicts and JSON
  inside a string, display names of name-addrs, and values of keys that name a person
  are replaced; stack frames and module names stay.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter, generate_latest

from crashreports.budget import Deadline, OverBudget
from crashreports.commands import MetricsUnavailable, crashes_command, dropped
from crashreports.patterns import SPAN_RULES, WORD_RULES, Rules, ValuePatterns
from crashreports.regex import Program
from crashreports.scrubber import (
    DropEvent,
    FilterLogParams,
    ScrubTree,
    compile_chain,
    sensitive_keys,
)
from crashreports.service import add_crashreports
from crashreports.settings import CrashSettings, Project, parse_crashreports
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.store import Store
from tomlsections.reader import ConfigError, Section
from webapi.errors import refusals
from webapi.ratelimit import LocalLimiters

PATTERNS = ValuePatterns()
MIB = 1 << 20
KEY = "0123456789abcdef0123456789abcdef"


def _mib(token: str, prefix: str = "", suffix: str = "") -> str:
    """`token` repeated to 1 MiB (of characters), between `prefix` and `suffix`."""
    body = token * (MIB // len(token) + 1)
    return prefix + body[: MIB - len(prefix) - len(suffix)] + suffix


# A string per rule, shaped to hit it again and again (and to keep a thread of it alive
# as long as the rule lets it), plus the combinations that once went quadratic.
ADVERSARIAL: dict[str, list[str]] = {
    "pem": [
        _mib("-----BEGIN "),
        _mib("-----BEGIN A-----x"),
        _mib("-----BEGIN A-----eyJaaaaa.bbbbb.c "),
        _mib("-----BEGIN A-----x", suffix="-----END A-----"),
    ],
    "digest": [_mib("Digest a="), _mib('Digest a="'), _mib("digest a=b, ")],
    "cred": [_mib("password: "), _mib("'password': '"), _mib('{"token": "x", ')],
    "credword": [_mib("password "), _mib("pwd pwd1 ")],
    "nameq": [_mib('"a" '), _mib('"Alice" <sip:a@b> ')],
    "name": [_mib("Alice "), _mib("A <sip:"), _mib("Alice Smith <tel:")],
    "jwt": [_mib("eyJ"), _mib("a", prefix="eyJ"), _mib("eyJaaaaa.bbbbb.c ")],
    "bearer": [_mib("bearer "), _mib("Bearer abcdefgh ")],
    "userinfo": [_mib("://a"), _mib("a", prefix="://")],
    "query": [_mib("token", prefix="x=1&"), _mib("x=1&token"), _mib("token")],
    "sip": [_mib("sip:"), _mib("sip:1.2.3.4x"), _mib("a", prefix="sip:")],
    "tel": [_mib("tel:1"), _mib("tel:+1 2 ")],
    "email": [_mib("a."), _mib("a@"), _mib("b.", prefix="a@")],
    "fcm": [_mib("abcdefghijk:"), _mib("b", prefix="a" * 20 + ":")],
    "apns": [_mib("a"), _mib("0123456789abcdef")],
    "iban": [_mib("DE89 "), _mib("DE89")],
    "mac": [_mib("0a:"), _mib("0a-")],
    "ipv6": [_mib("1:"), _mib("::1%a"), _mib("a", prefix="::1%")],
    "card": [_mib("1 "), _mib("1"), _mib("4111-")],
    "ipv4": [_mib("1."), _mib("1.2.3.4 ")],
    "e164": [_mib("+1 "), _mib("+49 151 2345678 ")],
    "us_phone": [_mib("(555) "), _mib("555-123-4567 ")],
    "national": [_mib("0"), _mib("0151 98765432 "), _mib("1:0")],
    "home": [_mib("/home/"), _mib("a", prefix="/home/"), _mib("C:\\Users\\")],
}


def test_every_rule_has_adversarial_strings() -> None:
    names = {rule.name for rule in (*WORD_RULES, *SPAN_RULES)} | {"pem"}
    assert set(ADVERSARIAL) == names


def test_no_rule_runs_on_stdlib_re() -> None:
    """Each alternation, the candidate scan and the key matcher are RE2 programs."""
    rules = [PATTERNS._words, PATTERNS._all, PATTERNS._phone]
    rules += [r for r in PATTERNS._by_features if r is not None]
    assert all(isinstance(r, Rules) and isinstance(r.program, Program) for r in rules)
    assert type(sensitive_keys()).__module__.startswith("re2")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(text, id=f"{name}-{i}")
        for name, texts in ADVERSARIAL.items()
        for i, text in enumerate(texts)
    ],
)
def test_one_mib_built_to_hit_a_rule_is_scrubbed_in_linear_time(text: str) -> None:
    # As in an event: joined with its neighbours by NUL, which no match may cross.
    changed = PATTERNS.sub_each(["before", text, "after"])
    assert isinstance(changed.get(1, text), str)
    assert 0 not in changed
    assert 2 not in changed


class StepClock:
    """A CPU clock that moves one second per reading (a module-level class, so that a
    worker process gets one too): any event that reads it twice is over a budget < 1 s."""

    def __init__(self) -> None:
        self.now = itertools.count()

    def __call__(self) -> float:
        return float(next(self.now))


class StillClock:
    def __call__(self) -> float:
        return 0.0


def _event(message: str) -> dict[str, Any]:
    return {
        "message": message,
        "breadcrumbs": {"values": [{"message": f"step {n}", "data": {"n": n}} for n in range(40)]},
    }


def test_an_event_over_the_cpu_budget_is_dropped_and_one_within_is_kept() -> None:
    over = compile_chain(opt_in=None, budget=0.5, clock=StepClock())
    with pytest.raises(DropEvent) as caught:
        over(_event("slow"))
    assert caught.value.reason == "over_budget"
    within = compile_chain(opt_in=None, budget=0.5, clock=StillClock())
    assert within(_event("call +49 151 23456789"))["message"] == "call [phone]"


def test_the_budget_is_read_inside_the_rules_not_only_between_steps() -> None:
    """One step (the tree walk and the rules) is cut short by the deadline it ticks."""
    step = ScrubTree(sensitive_keys(), PATTERNS)
    readings = StepClock()
    deadline = Deadline.start(0.5, readings, every=1)
    with pytest.raises(OverBudget):
        step({"message": "x=1&token=2 " * 100}, deadline)


def test_the_cpu_clock_is_read_only_once_the_wall_clock_has_passed_the_budget() -> None:
    """A thread cannot use more CPU time than wall time went by: before the wall clock
    passes the budget the CPU clock is not read; after, the CPU time alone decides."""
    cpu: list[float] = []

    def cpu_clock() -> float:
        cpu.append(0.0)
        return cpu_now[0]

    wall_now, cpu_now = [0.0], [0.0]
    deadline = Deadline(cpu_clock, 0.5, 1, lambda: wall_now[0], 0.5)
    wall_now[0] = 0.49
    deadline.tick()
    deadline.check()
    assert cpu == [], "the CPU clock is not read while the wall clock is within the budget"
    wall_now[0], cpu_now[0] = 2.0, 0.4  # much wall time, little CPU time: not over
    deadline.tick()
    assert len(cpu) == 1
    cpu_now[0] = 0.6
    with pytest.raises(OverBudget):
        deadline.tick()


def test_the_budget_is_configured_in_milliseconds_and_checked() -> None:
    settings = parse_crashreports(
        Section({"scrub_budget_ms": 20, "scrub_mode": "thread"}, Path("t.toml"), "crashreports")
    )
    assert settings.self_chain.budget == pytest.approx(0.02)
    assert settings.scrub_mode == "thread"
    default = parse_crashreports(Section({}, Path("t.toml"), "crashreports"))
    assert default.self_chain.budget == pytest.approx(0.05)
    assert default.scrub_mode == "process"
    with pytest.raises(ConfigError, match=r"crashreports\.scrub_budget_ms: must be at least 1"):
        parse_crashreports(Section({"scrub_budget_ms": 0}, Path("t.toml"), "crashreports"))
    with pytest.raises(ConfigError, match="not an RE2 regular expression"):
        parse_crashreports(Section({"scrub_patterns": ["(?<=x)y"]}, Path("t.toml"), "crashreports"))


STORE_KEY = web.AppKey("store", Store)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


@pytest.fixture
async def ingest(
    tmp_path: Path, clock: ManualClock
) -> AsyncIterator[Callable[[CrashSettings], Any]]:
    """The crash routes and a /metrics on 127.0.0.1, with a real store; stopped after."""
    servers: list[TestServer] = []

    async def start(crash: CrashSettings) -> tuple[str, web.Application]:
        app = web.Application(middlewares=[refusals])  # renders the refusals, as in build_app
        app[REGISTRY_KEY] = CollectorRegistry()

        async def store_ctx(app: web.Application) -> AsyncIterator[None]:
            app[STORE_KEY] = await Store.create(
                load_policy("auerproxy"), Keyring.generate(), tmp_path, clock
            )
            yield
            await app[STORE_KEY].close()

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(request.app[REGISTRY_KEY]))

        app.cleanup_ctx.append(store_ctx)
        add_crashreports(
            app, crash, clock, store=STORE_KEY, registry=REGISTRY_KEY, limiters=LocalLimiters(clock)
        )
        app.router.add_get("/metrics", metrics)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}", app

    yield start
    for server in servers:
        await server.close()


def _envelope(event: dict[str, Any]) -> bytes:
    payload = orjson.dumps(event)
    return b"{}\n" + orjson.dumps({"type": "event", "length": len(payload)}) + b"\n" + payload


@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_over_budget_through_the_ingest_is_stored_nowhere_and_counted_in_stats(
    ingest: Callable[[CrashSettings], Any],
    mode: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    over = compile_chain(opt_in=None, budget=0.5, clock=StepClock())
    within = compile_chain(opt_in=None, budget=0.5, clock=StillClock())
    crash = CrashSettings(
        projects=(Project("1", KEY, "dsn", over), Project("2", KEY, "dsn", within)),
        scrub_mode=mode,
    )
    url, app = await ingest(crash)
    headers = {"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={KEY}"}
    async with aiohttp.ClientSession() as session:
        for project in ("1", "2"):
            body = _envelope(_event("canary-over-budget +49 151 23456789"))
            async with session.post(
                f"{url}/api/{project}/envelope/", data=body, headers=headers
            ) as r:
                assert r.status == 200
    store = app[STORE_KEY]
    assert await store.find("crash_report", project="1") == []
    (kept,) = await store.find("crash_report", project="2")
    assert kept.fields["event"]["message"] == "canary-over-budget [phone]"
    registry = app[REGISTRY_KEY]
    labels = {"project": "1", "outcome": "over_budget"}
    assert registry.get_sample_value("softrelay_crash_events_total", labels) == 1.0

    args = argparse.Namespace(action="stats", project=None, metrics_url=f"{url}/metrics")
    assert await crashes_command(store, args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["project", "stored", "dropped:", "no_opt_in", "over_budget"]
    assert lines[1].split() == ["1", "0", "0", "1"]
    assert lines[2].split() == ["2", "1", "0", "0"]


async def test_stats_sends_the_metrics_token_when_the_scrape_needs_one() -> None:
    """`crashes stats --metrics-url` against a /metrics behind `[http] metrics_token`."""
    token = "metrics-token-0123456789"
    registry = CollectorRegistry()
    events = Counter("softrelay_crash_events", "", ["project", "outcome"], registry=registry)
    events.labels(project="7", outcome="over_budget").inc(3)

    async def metrics(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401)
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with TestServer(app, host="127.0.0.1") as server:
        url = str(server.make_url("/metrics"))
        with pytest.raises(MetricsUnavailable, match="401"):
            await dropped(url)
        assert await dropped(url, token) == {"7": {"over_budget": 3}}


# --- point 7 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("login failed: password hunter2xyz", "login failed: password [filtered]"),
        ("pw=s3cret&x=1", "pw=[filtered]&x=1"),
        ("passwd = correcthorse", "passwd = [filtered]"),
        ("Passwort: geheim123", "Passwort: [filtered]"),
        (
            'Authorization: Digest username="bob", realm="pbx", nonce="abc123", '
            'uri="sip:pbx.example.com", response="6629fae49393a05397450978507c4ef1", qop=auth',
            "Authorization: Digest [filtered]",
        ),
        ("ha1=" + "0123456789abcdef" * 2, "ha1=[filtered]"),
        ("HA1: " + "ab" * 32, "HA1: [filtered]"),
        (
            "config {'sip_password': 'hunter2', 'port': 5060}",
            "config {'sip_password': '[filtered]', 'port': 5060}",
        ),
        ('body {"password": "hunter2", "user": 1}', 'body {"password": "[filtered]", "user": 1}'),
        ('{"password": 123456}', '{"password": [filtered]}'),
        (
            'From: "Alice Smith" <sip:alice@pbx.example.com>',
            'From: "[name]" <sip:[sip-user]@pbx.example.com>',
        ),
        (
            "To: Alice Smith <sip:alice@pbx.example.com>",
            "To: [name] <sip:[sip-user]@pbx.example.com>",
        ),
        (
            "ringing bob <sips:bob@pbx.example.com>",
            "ringing [name] <sips:[sip-user]@pbx.example.com>",
        ),
        ("caller_name=Alice", "caller_name=[filtered]"),
        ("display_name: 'Alice Smith'", "display_name: '[filtered]'"),
    ],
)
def test_what_the_scrubber_let_through_is_replaced(text: str, scrubbed: str) -> None:
    assert PATTERNS.sub(text) == scrubbed


@pytest.mark.parametrize(
    "kept",
    [
        "password reset failed",
        "the password is wrong",
        "File phone/calls.py, line 42, in dial",
        "phone.calls.Dialer.dial",
        "sentry_sdk.integrations.logging",
        "<module>",
        "Traceback (most recent call last):",
    ],
)
def test_frames_modules_and_plain_words_about_passwords_stay(kept: str) -> None:
    assert PATTERNS.sub(kept) == kept


def test_values_of_keys_that_name_a_person_are_filtered_and_frames_kept() -> None:
    chain = compile_chain(opt_in=None)
    event = {
        "extra": {
            "caller_name": "Alice Smith",
            "display_name": "Alice",
            "callee": "Bob Jones",
            "contact": {"name": "Carol"},
            "first_name": "Dave",
            "last_name": "Evans",
            "full_name": "Frank Green",
            "count": 3,
        },
        "exception": {
            "values": [
                {
                    "type": "ValueError",
                    "module": "phone.calls",
                    "stacktrace": {
                        "frames": [{"function": "dial", "module": "phone.calls", "lineno": 7}]
                    },
                }
            ]
        },
        "contexts": {"os": {"name": "iOS", "version": "17.4.1"}},
    }
    out = chain(copy.deepcopy(event))
    assert out["extra"] == {
        "caller_name": "[filtered]",
        "display_name": "[filtered]",
        "callee": "[filtered]",
        "contact": "[filtered]",
        "first_name": "[filtered]",
        "last_name": "[filtered]",
        "full_name": "[filtered]",
        "count": 3,
    }
    assert out["exception"] == event["exception"]
    assert out["contexts"] == event["contexts"]


def test_a_log_parameter_its_scrubbed_message_no_longer_shows_is_filtered() -> None:
    step = FilterLogParams(PATTERNS)
    entry = {
        "message": "password %s for %s on port %s",
        "formatted": "password [filtered] for [email] on port 5060",
        "params": ["hunter2", "[email]", 5060],
    }
    assert step({"logentry": dict(entry)})["logentry"]["params"] == ["[filtered]", "[email]", 5060]
    # Without "formatted" (older SDKs) the message is formatted and scrubbed here.
    bare = {"message": entry["message"], "params": ["hunter2", "[email]", 5060]}
    assert step({"logentry": bare})["logentry"]["params"] == ["[filtered]", "[email]", 5060]
