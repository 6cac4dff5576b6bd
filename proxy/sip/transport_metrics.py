"""The SIP transports' metrics: flows open, messages handed on or dropped, connections
refused and flows closed, each by transport and, where there is one, by reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.sip.flow import Transport


class SipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.flows = Gauge(
            "softrelay_sip_flows", "Open SIP flows", ["transport"], registry=registry
        )
        self.received = Counter(
            "softrelay_sip_messages_received",
            "SIP messages handed to the handler",
            ["transport"],
            registry=registry,
        )
        self.dropped = Counter(
            "softrelay_sip_messages_dropped",
            "Messages dropped before the handler: overload, stopping, send_buffer",
            ["transport", "reason"],
            registry=registry,
        )
        self.refused = Counter(
            "softrelay_sip_refused",
            "Connections refused: per_ip, total, stopping",
            ["transport", "reason"],
            registry=registry,
        )
        self.closed = Counter(
            "softrelay_sip_flows_closed",
            "Flows the relay closed: idle, stalled, write_buffer, framing, evicted",
            ["transport", "reason"],
            registry=registry,
        )
        self.framing_errors = Counter(
            "softrelay_sip_framing_errors",
            "Oversize or unframeable input",
            ["transport"],
            registry=registry,
        )
        self.handler_errors = Counter(
            "softrelay_sip_handler_errors",
            "Exceptions raised by the message handler",
            ["transport"],
            registry=registry,
        )
        for transport in Transport:
            self.flows.labels(transport.value)
        # Bound once: a label look-up per message costs more than the count itself.
        self.received_on = {t: self.received.labels(t.value) for t in Transport}
        self.flows_on = {t: self.flows.labels(t.value) for t in Transport}
