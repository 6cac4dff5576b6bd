"""The console's arithmetic alone: windows over counter samples, histogram quantiles,
the chart series, the next deletion, and `[console]`'s parsing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from console.figures import Figures, Sources, _quantile
from console.history import History, ManualTicker, Sampler
from console.settings import ConsoleSettings, parse_console
from privacy.audit import CategoryVerdict
from privacy.clock import ManualClock
from privacy.keys import Keyring
from privacy.policy import load_policy
from privacy.retention import Sweeper
from privacy.store import Store
from softrelay.config import load_config
from tests.console.conftest import START
from tomlsections.reader import ConfigError, Section
from usage.settings import UsageSettings


def test_a_window_is_the_growth_since_the_newest_sample_that_old() -> None:
    history = History(keep=600, limit=100)
    history.add(START, {"c": 1.0})
    history.add(START + 100, {"c": 5.0})
    history.add(START + 400, {"c": 12.0})
    assert history.delta("c", START + 400, 300) == 7.0  # since START + 100
    assert history.delta("c", START + 400, 350) == 11.0  # since START
    # Younger than the window: the counters began at zero with the process.
    assert history.delta("c", START + 400, 1000) == 12.0
    assert history.deltas("", START + 400, 300) == {"c": 7.0}
    assert history.delta("c", START + 400, 300, {"c": 20.0}) == 15.0  # a fresh reading


def test_samples_and_points_older_than_kept_are_dropped() -> None:
    history = History(keep=10, limit=100)
    for t in range(0, 30, 2):
        history.add(START + t, {"c": float(t)})
        history.record("s", START + t, float(t))
    assert [t for t, _ in history.series()["s"]] == [START + t for t in range(18, 30, 2)]
    assert history.baseline(START + 28, 100) == {}  # the oldest kept is younger


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([(0.1, 0.0), (0.2, 10.0), (float("inf"), 10.0)], 0.5, 0.15),
        ([(0.1, 10.0), (0.2, 10.0), (float("inf"), 10.0)], 0.95, 0.095),
        ([(0.1, 0.0), (float("inf"), 4.0)], 0.5, 0.1),  # the open bucket: its lower bound
        ([(0.1, 0.0), (float("inf"), 0.0)], 0.5, None),
        ([], 0.5, None),
    ],
)
def test_quantiles_follow_prometheus_histogram_quantile(
    buckets: list[tuple[float, float]], q: float, expected: float | None
) -> None:
    assert _quantile(buckets, q) == (pytest.approx(expected) if expected is not None else None)


async def test_the_sampler_turns_once_per_tick_and_charts_rates_at_the_clocks_times(
    tmp_path: Path,
) -> None:
    """Counters of a registry of our own, sampled at each tick of a manual ticker: the
    push rate is the growth over the tick's span, wakes count only what was tried."""
    clock = ManualClock(START)
    registry = CollectorRegistry()
    pushes = Counter("softrelay_push", "", ["provider", "app", "outcome"], registry=registry)
    ends = Counter("softrelay_wake_calls", "", ["end"], registry=registry)
    delivery = Histogram(
        "softrelay_wake_delivery_seconds", "", buckets=(0.1, 0.2), registry=registry
    )
    flows = Gauge("softrelay_sip_flows", "", ["transport"], registry=registry)
    store = await Store.create(load_policy("auerproxy"), Keyring.generate(), tmp_path, clock)
    try:
        sources = Sources(
            policy=store.policy,
            store=store,
            registry=registry,
            sweeper=Sweeper(store, tmp_path),
            audit=_NoAudit(),
            sweep_interval=3600,
            usage=UsageSettings(),
            clock=clock,
        )
        figures = Figures(sources, History(1800, 1000))
        ticker = ManualTicker()
        seen: list[dict[str, object]] = []

        async def turn() -> dict[str, object]:
            return figures.sample()

        sampler = Sampler(turn, ticker)
        sampler.listen(seen.append)
        await sampler.turn()
        pushes.labels("apns", "a", "delivered").inc(10)
        flows.labels("wss").set(3)
        ends.labels("delivered").inc(3)
        ends.labels("timeout").inc(1)
        ends.labels("cancelled").inc(5)  # the caller hung up: no push was tried
        delivery.observe(0.15)
        clock.advance(5)
        overview = await sampler.turn()
        assert len(seen) == 2
        series = overview["series"]
        assert isinstance(series, dict)
        assert series["pushes_per_s"] == [[START, None], [START + 5, 2.0]]
        assert series["flows_total"][-1] == [START + 5, 3]
        assert series["wake_success_rate"][-1] == [START + 5, 0.75]
        assert overview["flows"] == {"udp": 0, "tcp": 0, "tls": 0, "ws": 3}
        wakes = overview["wakes"]
        assert isinstance(wakes, dict)
        assert (wakes["attempted"], wakes["delivered"]) == (4, 3)
        assert wakes["delivery_p50_ms"] == pytest.approx(150.0)
        assert overview["pushes"] == [{"provider": "apns", "outcome": "delivered", "count": 10}]
    finally:
        await store.close()


class _NoAudit:
    def __init__(self) -> None:
        self.verdicts: list[CategoryVerdict] = []
        self.taken_at: float | None = None

    async def refresh(self) -> None:
        return None


def _section(values: Mapping[str, object], tmp_path: Path) -> Section:
    return Section(dict(values), tmp_path / "softrelay.toml", "console")


def test_console_settings_read_the_token_and_refuse_what_cannot_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSOLE_TOKEN", "t" * 20)
    settings = parse_console(_section({"admin_token": "env:CONSOLE_TOKEN"}, tmp_path))
    assert settings.serving
    assert settings.listen == ("127.0.0.1", 8081)
    assert "t" * 20 not in repr(settings)
    assert not ConsoleSettings().serving  # no token: off
    monkeypatch.setenv("SHORT", "short")
    for values, key in (
        ({"admin_token": "in-the-file-itself-long"}, "console.admin_token"),
        ({"admin_token": "env:SHORT"}, "console.admin_token"),
        ({"listen": "localhost:1"}, "console.listen"),
        ({"tls_cert": str(tmp_path / "missing.pem")}, "console.tls_key"),
        ({"tick": "0s"}, "console.tick"),
        ({"tick": "2s", "history": "2s"}, "console.history"),
        ({"session_ttl": "30s"}, "console.session_ttl"),
        ({"colour": "blue"}, "console.colour"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_console(_section(values, tmp_path))
        assert caught.value.key == key, values
        assert caught.value.file.endswith("softrelay.toml")


def test_the_config_reads_console_at_serve_and_keeps_it_off_the_public_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSOLE_TOKEN", "t" * 20)
    config_file = tmp_path / "softrelay.toml"
    config_file.write_text(
        '[server]\nhttp_port = 8090\n[console]\nadmin_token = "env:CONSOLE_TOKEN"\n'
        'listen = "127.0.0.1:8090"\n',
        encoding="utf-8",
    )
    config = load_config(config_file, read_secrets=False)
    with pytest.raises(ConfigError) as caught:
        config.read_secrets(("console",))
    assert caught.value.key == "console.listen"
    config_file.write_text('[console]\nadmin_token = "in-the-file-itself-long"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_config(config_file, read_secrets=False)  # the source is checked at load
    assert refused.value.key == "console.admin_token"
