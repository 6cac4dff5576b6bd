"""What the SIP transports may hold and where they listen: `TransportLimits` and
`TransportSettings`, frozen and checked when made (the `[sip]` section's parser in
`proxy.sip.settings` builds them from the configuration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from proxy.sip.message import MAX_MESSAGE_SIZE

# Bounds of each graceful step of stopping the transports; past them the rest is aborted.
STOP_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class TransportLimits:
    max_message_size: int = MAX_MESSAGE_SIZE
    max_connections: int = 100_000  # TCP, TLS and WebSocket together
    max_connections_per_ip: int = 100  # 0 turns it off (everyone behind a load balancer)
    max_udp_flows: int = 100_000  # UDP peers remembered; the least recently heard is evicted
    idle_timeout: float = 300.0  # seconds without traffic from the peer
    write_stall_timeout: float = 30.0  # seconds a peer may leave our writes unread
    write_buffer: int = 256 * 1024  # bytes queued for one peer before it is closed
    max_pending: int = 32  # messages of one flow waiting for the handler

    def __post_init__(self) -> None:
        for name in ("max_message_size", "max_connections", "max_udp_flows", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connections_per_ip < 0:
            raise ValueError("max_connections_per_ip must be 0 (off) or more")
        if self.idle_timeout <= 0 or self.write_stall_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.write_buffer < max(4096, self.max_message_size):
            raise ValueError("write_buffer must hold a whole message (and 4096 bytes at least)")

    @property
    def write_high_water(self) -> int:
        """Senders wait for the peer above this; past `write_buffer` the peer is closed."""
        return self.write_buffer // 4

    @property
    def reap_interval(self) -> float:
        return max(1.0, min(self.idle_timeout, self.write_stall_timeout) / 4)


@dataclass(frozen=True, slots=True)
class TransportSettings:
    host: str = "127.0.0.1"
    udp_port: int | None = 5060  # None: no listener of that transport; 0: any free port
    tcp_port: int | None = 5060
    tls_port: int | None = None
    tls_cert: Path | None = None  # PEM certificate chain; holds the key too if tls_key is None
    tls_key: Path | None = None
    # PEM file of the CA(s) whose client certificates TLS peers may present (mutual TLS
    # for PBXs); None: no client certificate is asked for.
    tls_client_ca: Path | None = None
    limits: TransportLimits = field(default_factory=TransportLimits)
    # SO_REUSEPORT on every listener: the workers of `serve --workers N` bind the same
    # ports and the kernel spreads connections and datagrams over them.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.tls_port is not None and self.tls_cert is None:
            raise ValueError("a TLS port needs a certificate (tls_cert)")
