"""`softrelay billing`: the report of a month, and closing a month by hand.

    softrelay billing --month YYYY-MM [--format table|csv|json] [--suppress-below N] [--now T]
    softrelay billing close --month YYYY-MM [--now ISO-8601]

`softrelay.cli` owns the command and opens the store; this module parses and prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from privacy.clock import iso
from privacy.store import Store
from usage.closing import MonthCloser, NotClosable
from usage.period import parse_period
from usage.report import FORMATS, build_report, render
from usage.settings import UsageSettings


def add_billing_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """`sub` is the `softrelay` subparsers action (argparse keeps its class private)."""
    bill = sub.add_parser(
        "billing", parents=[common], help="monthly active installs per tenant, for invoices"
    )
    bill.add_argument("--month", type=_month, help="the billing month, YYYY-MM")
    bill.add_argument("--format", choices=FORMATS, default="table")
    bill.add_argument(
        "--suppress-below",
        type=_count,
        default=0,
        metavar="N",
        help="show counts under N as '<N' (shared dashboards); the total is left out then",
    )
    bill.add_argument("--now", help="report as if it were this ISO-8601 time")
    actions = bill.add_subparsers(dest="action")
    close = actions.add_parser(
        "close",
        parents=[common],
        help="close a month now: write its counts and audit row, destroy its secret",
    )
    close.add_argument("--month", type=_month, required=True, help="the month to close")
    close.add_argument("--now", help="close as if it were this ISO-8601 time")


async def billing(store: Store, settings: UsageSettings, args: argparse.Namespace) -> int:
    if args.month is None:
        print("softrelay: billing: --month YYYY-MM is required", file=sys.stderr)
        return 2
    if args.action == "close":
        return await _close(store, settings, args.month)
    report = await build_report(store, settings, args.month, suppress_below=args.suppress_below)
    print(render(report, args.format))
    return 0


async def _close(store: Store, settings: UsageSettings, month: str) -> int:
    closer = MonthCloser(store, settings)
    try:
        closed = await closer.close(month, by="cli")
    except NotClosable as exc:
        print(f"softrelay: billing close: {exc}", file=sys.stderr)
        return 1
    if closed.already:
        print(f"{month} was already closed; its counts are unchanged")
    else:
        print(f"closed {month}: {sum(closed.counts.values())} active installs")
    for tenant, count in closed.counts.items():
        print(f"  {tenant:<32} {count:>10}")
    # Its ids go too once the dispute window has ended, as the server's job would do.
    deleted = await closer.delete_ids_if_due(month)
    if deleted is not None:
        print(f"  deleted its {deleted} ids: only the counts remain")
    elif store.clock.now() < closer.ids_deleted_at(month):
        print(f"  its ids are kept for disputes until {iso(closer.ids_deleted_at(month))}")
    return 0


def _month(text: str) -> str:
    try:
        parse_period(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)
