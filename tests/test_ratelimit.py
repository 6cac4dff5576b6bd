"""The one token bucket (webapi/ratelimit.py) every limit uses, and the one client key
HTTP and SIP count by. The clock is injected: no test waits for time to pass."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from privacy.clock import ManualClock
from proxy.sip.flow import Flow, Transport
from proxy.sip.link import Refusal as ConnectionRefusal
from proxy.sip.transport_metrics import SipMetrics
from proxy.sip.transport_settings import TransportLimits, TransportSettings
from proxy.sip.transports import SipTransports
from webapi.ratelimit import RateLimit, RateLimiter, client_key


def test_a_bucket_gives_its_burst_then_one_token_per_refill_interval() -> None:
    clock = ManualClock(1000.0)
    limiter = RateLimiter(RateLimit(per_minute=60, burst=3), clock)  # one a second
    assert [limiter.take("k") for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    clock.advance(0.25)
    assert limiter.take("k") == 0.75, "a refused take took nothing: 0.25 of a token is there"
    clock.advance(0.75)
    assert limiter.take("k") == 0.0
    assert limiter.take("k") == 1.0
    clock.advance(2.0)  # two tokens back, not more than were taken
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 1.0]


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    clock = ManualClock(0.0)
    limiter = RateLimiter(RateLimit(per_minute=60, burst=2), clock)
    assert limiter.take("k") == 0.0
    clock.advance(3600)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 1.0]


def test_wait_takes_nothing() -> None:
    clock = ManualClock(0.0)
    limiter = RateLimiter(RateLimit(per_minute=6, burst=2), clock)  # one per 10 s
    assert [limiter.wait("k") for _ in range(5)] == [0.0] * 5
    assert [limiter.take("k") for _ in range(2)] == [0.0, 0.0]
    assert limiter.wait("k") == 10.0
    clock.advance(4)
    assert limiter.wait("k") == pytest.approx(6.0)
    assert limiter.wait("k") == pytest.approx(6.0)
    clock.advance(6)
    assert (limiter.wait("k"), limiter.take("k"), limiter.wait("k")) == (0.0, 0.0, 10.0)


def test_keys_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(RateLimit(per_minute=60, burst=1), ManualClock(0.0))
    assert [limiter.take("a"), limiter.take("b"), limiter.take("a")] == [0.0, 0.0, 1.0]


def test_per_minute_zero_never_limits() -> None:
    limiter = RateLimiter(RateLimit(per_minute=0, burst=1), ManualClock(0.0))
    assert {limiter.take("k") for _ in range(1000)} == {0.0}
    assert limiter.wait("k") == 0.0
    assert len(limiter) == 0


def test_per_window_is_a_burst_of_count_refilled_at_count_per_window() -> None:
    """How the DSR counts failed proofs (3 per 600 s) and crash ingest its events."""
    assert RateLimit.per_window(3, 600) == RateLimit(per_minute=0.3, burst=3)
    assert RateLimit.per_window(600, 60, max_tracked=5) == RateLimit(600, 600, 5)
    assert RateLimit.per_window(0, 3600).per_minute == 0  # off
    clock = ManualClock(0.0)
    failures = RateLimiter(RateLimit.per_window(3, 600), clock)
    for _ in range(3):
        assert failures.wait("client") == 0.0
        failures.take("client")
    assert failures.wait("client") == pytest.approx(200.0)  # one failure back per 200 s
    clock.advance(200)
    assert failures.wait("client") == 0.0
    assert failures.take("client") == 0.0
    assert failures.wait("client") == pytest.approx(200.0)


def test_full_buckets_are_forgotten_and_the_table_is_bounded() -> None:
    clock = ManualClock(0.0)
    limiter = RateLimiter(RateLimit(per_minute=60, burst=3, max_tracked=2), clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0
    assert limiter.take("c") == 0.0
    assert len(limiter) == 2, "the least recent key went first"
    clock.advance(3)  # burst / rate: every bucket is full again
    assert limiter.wait("d") == 0.0
    assert len(limiter) == 0


def test_check_counts_a_client_by_its_key() -> None:
    limiter = RateLimiter(RateLimit(per_minute=60, burst=1), ManualClock(0.0))
    assert limiter.check("2001:db8:1:2::a") == 0.0
    assert limiter.check("2001:db8:1:2:ffff::b") == 1.0, "the same /64"
    assert limiter.check("2001:db8:1:3::a") == 0.0
    assert limiter.check("192.0.2.7") == 0.0
    assert limiter.check("::ffff:192.0.2.7") == 1.0, "the same IPv4 host"


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),  # IPv4: the address (/32)
        ("2001:db8:1:2::a", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::A", "2001:db8:1:2::/64"),  # one spelling per prefix
        ("fe80::1%eth0", "fe80::/64"),  # a link-local zone does not split a client
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped IPv6: the IPv4 host
        ("::ffff:c000:207", "192.0.2.7"),
        ("::1", "::/64"),
        (None, ""),
        ("", ""),
        ("not:an:address", "not:an:address"),  # what is no address counts as it is
    ],
)
def test_client_key(address: str | None, key: str) -> None:
    assert client_key(address) == key


def test_the_sip_per_ip_limit_counts_by_the_same_key() -> None:
    """SIP's connection limit (proxy/sip) counts clients as HTTP's limits do."""
    limits = TransportLimits(max_connections_per_ip=1)
    sip = SipTransports(
        TransportSettings(limits=limits),
        _no_handler,
        ManualClock(0.0),
        SipMetrics(CollectorRegistry()),
    )
    assert sip.admit(Transport.TCP, "2001:db8:1:2::a") is None
    assert sip.admit(Transport.TCP, "2001:db8:1:2:ffff::b") is ConnectionRefusal.PER_IP
    assert sip.admit(Transport.TCP, "2001:db8:1:3::a") is None
    assert sip.admit(Transport.TCP, "192.0.2.7") is None
    assert sip.admit(Transport.TCP, "::ffff:192.0.2.7") is ConnectionRefusal.PER_IP


async def _no_handler(data: bytes, flow: Flow) -> None:
    raise AssertionError("no message is handled here")


def test_a_cost_takes_that_many_tokens_at_once_or_none() -> None:
    clock = ManualClock(0.0)
    limiter = RateLimiter(RateLimit(per_minute=60, burst=10), clock)
    assert limiter.take("k", cost=7) == 0.0
    assert limiter.take("k", cost=4) == 1.0, "3 left: one more second for the fourth"
    assert limiter.take("k", cost=3) == 0.0, "the refused take took nothing"
    clock.advance(10)
    assert limiter.take("k", cost=10) == 0.0
    with pytest.raises(ValueError, match="cannot be taken"):
        limiter.take("k", cost=11)
    with pytest.raises(ValueError, match="cannot be taken"):
        limiter.take("k", cost=0)
