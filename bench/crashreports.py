"""Crash reports: our scrubbing chain against Sentry Relay's PII engine, the adversarial
events of issue 14 point 1, and ingest end to end through `softrelay serve`.

    .venv/bin/python bench/crashreports.py [--mode all|scrub|adversarial|ingest]
        [--sample 200] [--rounds 9] [--events 3000] [--ingest-rounds 3] [--concurrency 32]
        [--crash-option LINE ...] [--adversarial-repeat 5] [--adversarial-timeout 30]
        [--note TEXT] [--out FILE]

Events are made by the stock sentry-sdk (`bench/crashevents.py`): an exception raised
through nested calls, 20 breadcrumbs, contexts, tags and extra, each event holding its
own planted personal data of every kind the audit named. Two sizes: ~7.7 KiB of JSON
(frames without locals or source lines, no installed modules) and ~16 KiB (the SDK's
defaults).

scrub        Per size, `--rounds` timed rounds, each on `--sample` events none of the
             scrubbers has seen, the scrubbers interleaved (order alternating by round):
             bytes of the event in, scrubbed JSON out. Ours: `orjson.loads`, the chain as
             serve compiles it (CPU budget included), `orjson.dumps`, as the ingest does.
             Relay: `pii_strip_event` with the config `convert_datascrubbing_config` makes
             of Sentry's defaults, given the event's bytes and the config encoded once
             (its best case; `relay_documented` is the same call with dicts and `json`).
             The SDK's own `EventScrubber`, for reference. Events/s is the median of the
             rounds; ours/Relay the median of per-round ratios, with min and max. Before
             the rounds, each scrubber's output of one more sample is searched for every
             planted value: per kind, the events still holding it of those that had it.
adversarial  Each adversarial string of point 1 (~100 KB and 1 MiB) as an event, in a child
             process per engine (killed after `--adversarial-timeout` s): ours without a
             CPU budget, ours as served (with it), Relay; the median ms of up to
             `--adversarial-repeat` runs (fewer once 5 s are spent).
ingest       Per size and round, a fresh `softrelay serve` (`bench/crashingest.py`) with
             one crash project; a separate client process posts `--events` gzip envelopes
             (plus a 10% warm-up), each the stock SDK's serialisation of its own event,
             from `--concurrency` connections. Each is answered 200 only after its
             scrubbed event is committed; after the server stops, the stored reports are
             counted. Both processes share this machine's cores; the CPU per envelope of
             serve, of serve with its scrubbing workers, and of the client are given.

Targets (issue 14): ours at least 2x Relay's events/s with 0 planted values left; the
worst adversarial event in at most 50 ms; ingest at least 2,000 envelopes/s. The exit
status is 1 when one is missed. `os.getloadavg()` is recorded beside every section: the
machine may be shared.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as `python bench/crashreports.py`, this file's folder comes first on sys.path and
# its name would hide the `crashreports` package: the repository root goes first instead.
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import orjson  # noqa: E402 - after the sys.path fix above
from sentry_sdk.scrubber import EventScrubber  # noqa: E402

import crashreports.settings  # noqa: E402
from bench.crashevents import (  # noqa: E402
    KINDS,
    SIZES,
    adversarial_event,
    adversarial_texts,
    envelope_of,
    event_of,
    gzip_sdk,
    left_by_kind,
    sdk_envelopes,
)
from bench.crashingest import ingest, load_average  # noqa: E402
from bench.harness import spread, write_result  # noqa: E402
from crashreports.scrubber import Chain, DropEvent, compile_chain  # noqa: E402

# serve's default CPU budget per event; None in a tree from before it (the baseline).
BUDGET_MS: int | None = getattr(crashreports.settings, "DEFAULT_BUDGET_MS", None)

DEFAULT_OUT = _HERE / "results" / "crashreports.json"
ADVERSARIAL_SIZES = (100_000, 1 << 20)
TARGET_RATIO, TARGET_MS, TARGET_INGEST = 2.0, 50.0, 2000.0
# What Sentry's project settings hold by default (sentry/datascrubbing.py).
SENTRY_DEFAULTS = {
    "scrubData": True,
    "scrubDefaults": True,
    "scrubIpAddresses": True,
    "sensitiveFields": [],
    "excludeFields": [],
}
Scrub = Callable[[bytes], str | bytes]


def _as_is(value: Any) -> Any:
    return value


class RelayPii:
    """Relay's PII engine through the `sentry-relay` package (the `bench` extra).

    Imported by name, so that the bench and `mypy` run without the extra (it is never a
    dependency of softrelay): its untyped functions are held as `Callable[..., Any]`."""

    def __init__(self) -> None:
        processing = importlib.import_module("sentry_relay.processing")
        self.version = importlib.metadata.version("sentry-relay")
        self.config: dict[str, Any] = processing.convert_datascrubbing_config(SENTRY_DEFAULTS)
        self._encoded = orjson.dumps(self.config)
        self._strip: Callable[..., Any] = processing.pii_strip_event

    def __call__(self, raw: bytes) -> str:
        """Its best case: bytes handed straight to Relay, its JSON returned undecoded."""
        out: str = self._strip(self._encoded, raw, json_dumps=_as_is, json_loads=_as_is)
        return out

    def documented(self, raw: bytes) -> str:
        """As its docstring shows it: the event and config as dicts, `json` both ways."""
        return orjson.dumps(self._strip(self.config, orjson.loads(raw))).decode()


def served_chain() -> Chain:
    """A project's chain as `serve` compiles it by default (its CPU budget included),
    without the opt-in check (every bench event carries the tag)."""
    if BUDGET_MS is None:
        return compile_chain(opt_in=None)
    return compile_chain(opt_in=None, budget=BUDGET_MS / 1000)


def _ours(dropped: list[int]) -> Scrub:
    chain = served_chain()

    def scrub(raw: bytes) -> bytes:
        try:
            return orjson.dumps(chain(orjson.loads(raw)))
        except DropEvent:  # over its budget: nothing of it is kept
            dropped[0] += 1
            return b""

    return scrub


def _sdk(scrubber: EventScrubber) -> Scrub:
    def scrub(raw: bytes) -> bytes:
        event = orjson.loads(raw)
        scrubber.scrub_event(event)
        # It leaves `AnnotatedValue`s, which the SDK's serializer turns into their value.
        return orjson.dumps(event, default=lambda v: getattr(v, "value", None))

    return scrub


# --- scrub: ours against Relay on the same events --------------------------------------


def compare(chunks: list[list[bytes]], start: int, scrubbers: dict[str, Scrub]) -> dict[str, Any]:
    """The planted values each scrubber leaves in the first chunk of events (numbered from
    `start`), then one timed round per further chunk: every event is new to every
    scrubber when it is timed, so what one remembers across events gains only on what
    recurs between different events (frames, SDK fields), as it would in production."""
    names = list(scrubbers)
    out: dict[str, Any] = {}
    first = chunks[0]
    for name in names:  # also the warm-up (Relay compiles its rules on first use)
        kinds = left_by_kind(first, [scrubbers[name](raw) for raw in first], start)
        out[name] = {
            "left_by_kind": kinds,
            "left": sum(left for left, _ in kinds.values()),
            "present": sum(present for _, present in kinds.values()),
            "kinds_left": [kind for kind, (left, _) in kinds.items() if left],
        }
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r, raws in enumerate(chunks[1:]):
        for name in names if r % 2 == 0 else reversed(names):
            fn = scrubbers[name]
            began = time.perf_counter()
            for raw in raws:
                fn(raw)
            rates[name].append(len(raws) / (time.perf_counter() - began))
    for name in names:
        out[name]["events_per_s"] = round(statistics.median(rates[name]))
        out[name]["rounds_events_per_s"] = [round(rate) for rate in rates[name]]
    if "relay" in rates:
        ratios = [o / r for o, r in zip(rates["ours"], rates["relay"], strict=True)]
        out["ratio_ours_relay"] = {
            **spread(ratios, 2),
            "rounds": [round(ratio, 2) for ratio in ratios],
        }
    return out


def scrub_mode(args: argparse.Namespace, relay: RelayPii | None) -> list[dict[str, Any]]:
    dropped = [0]
    scrubbers: dict[str, Scrub] = {"ours": _ours(dropped)}
    if relay is not None:
        scrubbers["relay"] = relay
        scrubbers["relay_documented"] = relay.documented
    scrubbers["sdk_event_scrubber"] = _sdk(EventScrubber())
    results = []
    for n, (label, full) in enumerate(SIZES):
        start = n * 10**6  # each size's events with planted values of their own
        made = sdk_envelopes(args.sample * (args.rounds + 1), full, start)
        raws = [event_of(e) for e in made]
        chunks = [raws[k : k + args.sample] for k in range(0, len(raws), args.sample)]
        load = load_average()
        dropped[0] = 0
        row = compare(chunks, start, scrubbers)
        # Of the (rounds + 1) x sample runs of our chain: over its CPU budget, not kept.
        row["ours"]["dropped_over_budget"] = dropped[0]
        row |= {
            "label": label,
            "mean_event_bytes": round(sum(map(len, raws)) / len(raws)),
            "load_before": load,
            "load_after": load_average(),
        }
        results.append(row)
    return results


# --- adversarial: point 1's events through our chain -----------------------------------


def adversarial_child(name: str, size: int, repeat: int, engine: str) -> None:
    """In the child process: time `engine` on one adversarial event and print the runs
    as JSON. `ours`: our chain without a CPU budget (does the engine itself finish?);
    `served`: with the budget `serve` gives it by default; `relay`: Relay's engine."""
    text = adversarial_texts(size)[name]
    if engine == "relay":
        relay = RelayPii()
        raw = orjson.dumps(adversarial_event(text))

        def run() -> None:
            relay(raw)

    else:
        chain = served_chain() if engine == "served" else compile_chain(opt_in=None)
        # Warm, as serve's workers warm their chains before the first report.
        chain(orjson.loads(event_of(sdk_envelopes(1, False)[0])))

        def run() -> None:
            chain(adversarial_event(text))

    runs: list[float] = []
    outcomes: dict[str, int] = {}
    while len(runs) < repeat and sum(runs) < 5.0:
        outcome = "scrubbed"
        start = time.perf_counter()
        try:
            run()
        except DropEvent as exc:
            outcome = f"dropped ({exc.reason})"
        runs.append(time.perf_counter() - start)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(orjson.dumps({"ms": [round(t * 1000, 2) for t in runs], "outcomes": outcomes}).decode())


def _adversarial_run(args: argparse.Namespace, name: str, size: int, engine: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--adversarial-child", name, str(size)]
    command += [str(args.adversarial_repeat), engine]
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=args.adversarial_timeout, check=True
        )
    except subprocess.TimeoutExpired:
        killed = f"killed after {args.adversarial_timeout:g} s"
        return {"median_ms": None, "outcome": killed, "all_scrubbed": False}
    except subprocess.CalledProcessError as exc:
        error = (exc.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        return {"median_ms": None, "outcome": f"failed: {error}", "all_scrubbed": False}
    child = orjson.loads(done.stdout.splitlines()[-1])
    outcomes: dict[str, int] = child["outcomes"]
    return {
        "median_ms": statistics.median(child["ms"]),
        "runs_ms": child["ms"],
        "outcome": ", ".join(f"{what} x{count}" for what, count in outcomes.items()),
        "all_scrubbed": list(outcomes) == ["scrubbed"],
    }


def adversarial_mode(args: argparse.Namespace, relay: bool) -> list[dict[str, Any]]:
    results = []
    for size in ADVERSARIAL_SIZES:
        for name, text in adversarial_texts(size).items():
            envelope = gzip_sdk(envelope_of(adversarial_event(text)))
            row: dict[str, Any] = {"rule": name, "chars": len(text), "gzip_bytes": len(envelope)}
            row["load_before"] = load_average()
            row |= _adversarial_run(args, name, size, "ours")
            row["served"] = _adversarial_run(args, name, size, "served")
            if relay:
                row["relay"] = _adversarial_run(args, name, size, "relay")
            results.append(row)
    return results


# --- the report ------------------------------------------------------------------------


def _timed(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if entry["median_ms"] is None:
        return str(entry["outcome"])
    return f"{entry['median_ms']:,.1f} ({entry['outcome']})"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(result: dict[str, Any]) -> bool:
    """Prints the tables; True when every target measured is met."""
    passed = True
    for row in result.get("scrub", []):
        ratio = row.get("ratio_ours_relay")
        ok = ratio is not None and ratio["median"] >= TARGET_RATIO and row["ours"]["left"] == 0
        passed &= ok
        print(
            f"\n-- scrubbing, events of {row['mean_event_bytes'] / 1024:.1f} KiB ({row['label']}),"
            f" load {row['load_before']} -> {row['load_after']}"
        )
        names = [n for n in ("ours", "relay", "relay_documented", "sdk_event_scrubber") if n in row]
        print(f"{'scrubber':<44}{'events/s':>10}  planted left (events x kinds)")
        for name in names:
            entry = row[name]
            dropped = entry.get("dropped_over_budget")
            note = f"  (dropped over budget: {dropped})" if dropped else ""
            print(
                f"{name:<44}{entry['events_per_s']:>10,}  {entry['left']}/{entry['present']}{note}"
            )
        if ratio:
            print(
                f"ours/relay: median {ratio['median']} (min {ratio['min']}, max {ratio['max']})"
                f", target >= {TARGET_RATIO} with 0 left: {_verdict(ok)}"
            )
        shown = [n for n in names if n != "relay_documented"]
        print(f"{'planted kind':<44}" + "".join(f"{n[:12]:>13}" for n in shown))
        for kind in KINDS:
            cells = [row[n]["left_by_kind"][kind] for n in shown]
            print(f"{kind:<44}" + "".join(f"{f'{a}/{b}':>13}" for a, b in cells))
    adversarial = result.get("adversarial", [])
    if adversarial:
        print(
            f"\n-- adversarial events (point 1), ms: ours without a CPU budget (target <= "
            f"{TARGET_MS:g} ms, scrubbed), ours as served ({BUDGET_MS} ms budget), Relay"
        )
        worst = 0.0
        for row in adversarial:
            ms = row["median_ms"]
            worst = max(worst, ms if ms is not None and row["all_scrubbed"] else float("inf"))
            print(
                f"{row['rule']:<6}{row['chars']:>10,} chars, gzip {row['gzip_bytes']:>5} B  "
                f"{_timed(row)}  |  {_timed(row.get('served'))}  |  {_timed(row.get('relay'))}"
                f"  (load {row['load_before'][0]})"
            )
        passed &= worst <= TARGET_MS
        worst_text = "not all scrubbed" if worst == float("inf") else f"{worst:,.1f} ms"
        print(f"worst: {worst_text}: {_verdict(worst <= TARGET_MS)}")
    for row in result.get("ingest", []):
        median = row["median_envelopes_per_s"]
        ok = median is not None and median >= TARGET_INGEST
        ok &= all(r.get("stored") == r.get("posted") for r in row["rounds"])
        passed &= ok
        print(
            f"\n-- ingest through `softrelay serve`, {row['label']}"
            f" (gzip {row['mean_gzip_bytes']} B)"
        )
        for r in row["rounds"]:
            if "error" in r:
                print(f"round failed: {r['error']}; the server's log ends:\n{r['serve_log_tail']}")
                continue
            print(
                f"{r['envelopes_per_s']:>8,} envelopes/s  CPU/envelope: serve "
                f"{r['server_cpu_us_per_envelope']} us, with its workers "
                f"{r['server_tree_cpu_us_per_envelope']} us, client "
                f"{r['client_cpu_us_per_envelope']} us; "
                f"statuses {r['statuses']}, stored {r['stored']}/{r['posted']}"
                f"  (load {r['load_before'][0]})"
            )
        rate = "-" if median is None else f"{median:,}/s"
        print(f"median {rate}, target >= {TARGET_INGEST:,.0f}: {_verdict(ok)}")
    return passed


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--adversarial-child":
        adversarial_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("all", "scrub", "adversarial", "ingest"), default="all")
    parser.add_argument("--sample", type=int, default=200, help="events per size (scrub)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (scrub)")
    parser.add_argument("--events", type=int, default=3000, help="timed envelopes per round")
    parser.add_argument("--ingest-rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--crash-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a line added to [crashreports] of the served config, e.g. scrub_workers = 2",
    )
    parser.add_argument("--adversarial-repeat", type=int, default=5)
    parser.add_argument("--adversarial-timeout", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", default="", help="kept in the JSON, e.g. the commit measured")
    args = parser.parse_args()

    relay: RelayPii | None = None
    try:
        relay = RelayPii()
    except ImportError:
        print("sentry-relay is not installed (pip install -e '.[bench]'): no Relay figures")
    result: dict[str, Any] = {
        "note": args.note,
        "tree": str(_ROOT),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "sentry_relay": relay.version if relay else None,
        "relay_config_from": SENTRY_DEFAULTS,
        "crash_options": args.crash_option,
        "load_at_start": load_average(),
    }
    started = time.perf_counter()
    if args.mode in ("all", "scrub"):
        result["scrub"] = scrub_mode(args, relay)
    if args.mode in ("all", "adversarial"):
        result["adversarial"] = adversarial_mode(args, relay is not None)
    if args.mode in ("all", "ingest"):
        result["ingest"] = ingest(
            args.events, args.ingest_rounds, args.concurrency, tuple(args.crash_option)
        )
    result["load_at_end"] = load_average()
    passed = report(result)
    wall = time.perf_counter() - started
    print(f"\n{_verdict(passed)}; load {result['load_at_start']} -> {result['load_at_end']};")
    print(f"wall {wall:.0f} s; wrote {args.out}")
    write_result(args.out, result)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
