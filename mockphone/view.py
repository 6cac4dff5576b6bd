"""The live terminal view of `softrelay simulate`, and its summary tables (rich)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from mockphone.phone import State
from mockphone.simulate import latency_summary

if TYPE_CHECKING:
    from mockphone.simulate import Simulation

REFRESH = 0.5  # seconds between redraws


class LiveView:
    """Redraws progress, phones, calls, wakes and errors while the simulation runs."""

    def __init__(self, simulation: Simulation, *, enabled: bool = True) -> None:
        self.simulation = simulation
        self.enabled = enabled
        self._live: Live | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LiveView:
        if self.enabled:
            self._live = Live(self.render(), refresh_per_second=4, transient=True)
            self._live.start()
            self._task = asyncio.create_task(self._refresh(), name="simulate-view")
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._live is not None:
            self._live.stop()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            if self._live is not None:
                self._live.update(self.render())

    def render(self) -> Group:
        sim = self.simulation
        stats, settings = sim.stats, sim.settings
        elapsed = sim.elapsed()
        states = {state: 0 for state in State}
        for phone in sim.phones:
            states[phone.state] += 1
        table = Table.grid(padding=(0, 2))
        table.add_row(
            "time", f"{elapsed:,.0f} / {settings.duration:,.0f} s (speed {settings.speed:g})"
        )
        table.add_row(
            "phones",
            f"{len(sim.phones)}: {states[State.AWAKE]} awake, {states[State.ASLEEP]} asleep, "
            f"{states[State.OFFLINE]} offline; {stats.registered} registered",
        )
        table.add_row(
            "calls",
            f"{stats.calls_attempted} attempted, {stats.calls_connected} connected, "
            f"{sum(stats.calls_failed.values())} failed, {stats.calls_in_progress} ringing/talking",
        )
        wakes = latency_summary(stats.wake_latencies)
        table.add_row(
            "wakes",
            f"{stats.woken_calls} woken calls; latency p50 {_s(wakes['p50'])} "
            f"p95 {_s(wakes['p95'])} p99 {_s(wakes['p99'])}",
        )
        table.add_row(
            "pings / crashes",
            f"{sum(stats.pings.values())} pings; {sum(stats.crashes.values())} crash reports",
        )
        if stats.calls_failed or stats.register_failed:
            top = (stats.calls_failed + stats.register_failed).most_common(3)
            table.add_row("errors", ", ".join(f"{reason}: {n}" for reason, n in top))
        bar = ProgressBar(total=settings.duration, completed=min(elapsed, settings.duration))
        return Group(bar, table)


def _s(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The end-of-run tables: calls, failures by reason, wakes, pushes, pings, crashes."""
    console = console or Console()
    calls = summary["calls"]
    head = Table(title="softrelay simulate", show_header=False)
    head.add_row("phones / PBXs", f"{summary['phones']} / {summary['pbxs']}")
    head.add_row(
        "simulated / wall",
        f"{summary['simulated_seconds']:.1f} s / {summary['wall_seconds']:.1f} s"
        + (" (interrupted)" if summary["interrupted"] else ""),
    )
    regs = summary["registrations"]
    head.add_row("registered", f"{regs['ok']} ({sum(regs['failed'].values())} failed)")
    head.add_row("calls attempted", str(calls["attempted"]))
    head.add_row("calls connected", str(calls["connected"]))
    head.add_row("calls to sleeping phones", str(calls["woken"]))
    wake = summary["wake_latency"]
    head.add_row(
        "wake latency p50 / p95 / p99",
        f"{_s(wake['p50'])} / {_s(wake['p95'])} / {_s(wake['p99'])} ({wake['count']} wakes)",
    )
    pings = summary["pings"]
    head.add_row(
        "usage pings",
        f"{pings['sent']} ({', '.join(f'{k}: {v}' for k, v in pings['by_status'].items()) or '-'})",
    )
    crashes = summary["crash_reports"]
    head.add_row(
        "crash reports",
        f"{crashes['sent']} sent ({crashes['opted_in']} opted in, "
        f"{crashes['not_opted_in']} not; {crashes['errors']} SDK errors)",
    )
    console.print(head)
    if calls["failed"]:
        failed = Table(title="calls failed, by reason")
        failed.add_column("reason")
        failed.add_column("calls", justify="right")
        for reason, count in calls["failed"].items():
            failed.add_row(reason, str(count))
        console.print(failed)
    sipis = summary.get("sipis")
    if sipis:
        print_sipis(sipis, console)
    contacts = summary.get("contacts")
    if contacts:
        print_contacts(contacts, console)
    pushes = Table(title="pushes, by outcome (the relay's counters)")
    pushes.add_column("outcome")
    pushes.add_column("pushes", justify="right")
    for outcome, count in summary["pushes"].items():
        pushes.add_row(outcome, f"{count:g}")
    console.print(pushes)
    nodes = summary.get("nodes", {})
    if len(nodes) > 1:
        # Narrow headers: the table fits 80 columns with a host:port per row.
        per_node = Table(title="per node (the calls to or from its phones)", show_edge=False)
        per_node.add_column("node", no_wrap=True)
        for column in ("phones/PBXs", "reg", "calls", "conn", "woken", "wake p50", "pushes"):
            per_node.add_column(column, justify="right")
        for name, node in nodes.items():
            calls = node["calls"]
            per_node.add_row(
                name,
                f"{node['phones']}/{node['pbxs']}",
                str(node["registrations"]["ok"]),
                str(calls["attempted"]),
                str(calls["connected"]),
                str(calls["woken"]),
                _s(node["wake_latency"]["p50"]),
                f"{sum(node['pushes'].values()):g}",
            )
        console.print(per_node)


def print_sipis(sipis: dict[str, Any], console: Console) -> None:
    """SIPIS mode's table: accounts registered on behalf, calls and texts to its apps."""
    table = Table(title="SIPIS-mode apps", show_header=False)
    accounts, calls, texts = sipis["accounts"], sipis["calls"], sipis["texts"]
    failed = sum(accounts["failed"].values())
    table.add_row("apps / accounts registered", f"{sipis['apps']} / {accounts['registered']}")
    if failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in accounts["failed"].items())
        table.add_row("accounts failed", reasons)
    table.add_row(
        "calls to sleeping apps / delivered",
        f"{calls['to_sleeping_apps']} / {calls['delivered_to_sleeping_apps']}",
    )
    table.add_row("calls attempted / connected", f"{calls['attempted']} / {calls['connected']}")
    latency = sipis["delivery_latency"]
    table.add_row(
        "INVITE to app p50 / p95 / p99",
        f"{_s(latency['p50'])} / {_s(latency['p95'])} / {_s(latency['p99'])}",
    )
    placed = sipis["placed_calls"]
    table.add_row("calls placed / connected", f"{placed['attempted']} / {placed['connected']}")
    answered = ", ".join(f"{k}: {v}" for k, v in texts["answered"].items()) or "-"
    table.add_row(
        "texts sent / delivered",
        f"{texts['sent']} / {texts['delivered_to_sleeping_apps']} (answers {answered})",
    )
    console.print(table)


def print_contacts(contacts: dict[str, Any], console: Console) -> None:
    """The contacts mix's table: devices, books synced, discovery, and every fault."""
    table = Table(title="contacts (books and Smart Contacts)", show_header=False)
    books, found = contacts["books"], contacts["discovery"]
    table.add_row("result", "ok" if contacts["ok"] else "FAULTS (see below)")
    table.add_row(
        "users / devices / discoverable",
        f"{contacts['users']} / {contacts['devices']} / {contacts['discoverable']}",
    )
    table.add_row(
        "books written / merged after 412 / read back / mismatches",
        f"{books['written']} / {books['conflicts_merged']} / {books['read_back']}"
        f" / {books['mismatches']}",
    )
    table.add_row(
        "discoveries / numbers checked / sent / matched",
        f"{found['runs']} / {found['checked']} / {found['sent']} / {found['matched']}",
    )
    table.add_row(
        "wrong matches / unexpected sends / deferred (quota)",
        f"{found['wrong_matches']} / {found['unexpected_sends']} / {found['deferred']}",
    )
    if contacts["errors"]:
        table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in contacts["errors"].items()))
    console.print(table)
