"""`softrelay dsr ...`: data-subject requests by the operator, on the data directory.

    softrelay dsr export     --user U --serial S [--output FILE]
    softrelay dsr rectify    --user U --serial S --set push_token=T [--set push_app_id=A]
                             [--instance URN]
    softrelay dsr erase      --user U --serial S
    softrelay dsr restrict   --user U --serial S
    softrelay dsr unrestrict --user U --serial S
    softrelay dsr object     --user U --serial S

Whoever can run this can read the data directory and its keys: they act as the
operator, on a request they verified (the trail records actor `operator`). The JSON
result goes to standard output (or --output, created with mode 0600).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from dsr.service import ACTIONS, DataSubjectRights, DsrSettings, InvalidRequest, parse_subject
from privacy.store import Store


def add_dsr_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dsr = sub.add_parser("dsr", help="data-subject requests (export, rectify, erase, ...)")
    actions = dsr.add_subparsers(dest="action", required=True)
    for action in ACTIONS:
        parser = actions.add_parser(action, parents=[common], help=f"{action} a subject's data")
        parser.add_argument("--user", required=True, help="the subject's SIP user name")
        parser.add_argument("--serial", required=True, help="the serial of the subject's PBX")
        parser.add_argument("--now", help="act as if it were this ISO-8601 time")
        if action == "export":
            parser.add_argument("--output", help="file to write (default: standard output)")
        if action == "rectify":
            parser.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="FIELD=VALUE",
                help="a field to correct (push_token, push_app_id)",
            )
            parser.add_argument("--instance", default="", help="only this device's registration")


async def dsr_command(store: Store, settings: DsrSettings, args: argparse.Namespace) -> int:
    rights = DataSubjectRights(store, settings)
    try:
        subject = parse_subject(args.user, args.serial)
        if args.action == "export":
            result: dict[str, Any] = await rights.export(subject, "operator")
        elif args.action == "rectify":
            changes = dict(_pair(item) for item in args.set)
            receipt = await rights.rectify(subject, changes, "operator", instance=args.instance)
            result = receipt.as_json()
        elif args.action == "erase":
            result = (await rights.erase(subject, "operator")).as_json()
        elif args.action in ("restrict", "unrestrict"):
            on = args.action == "restrict"
            result = (await rights.restrict(subject, on, "operator")).as_json()
        else:
            result = (await rights.object(subject, "operator")).as_json()
    except InvalidRequest as exc:
        print(f"softrelay: dsr {args.action}: {exc}", file=sys.stderr)
        return 2
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    output = getattr(args, "output", None)
    if output:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        print(f"softrelay: export written to {Path(output)}")
    else:
        sys.stdout.write(data.decode())
    return 0


def _pair(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep:
        raise InvalidRequest(f"--set {item!r}: expected FIELD=VALUE")
    return name, value
