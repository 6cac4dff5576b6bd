"""The contacts mix of `softrelay simulate` (mockphone/contactsmix.py) against an embedded
softrelay on an injected stepped pace: every contacts user proves two devices at its
mock PBX, opts in, syncs its book with one forced 412 merge and finds exactly the other
users; each `contacts` event is one more write, read-back and incremental discovery. The
figures are checked exactly against the users and the events the seed drew; the mix off
leaves a run as it was. (Against a served relay: tests/contacts/test_canary.py.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from mockphone.contactsmix import BOOK_STRANGERS, user_number
from mockphone.delays import SteppedPace
from mockphone.phone import Answer, Kind
from mockphone.scenario import load_scenario
from mockphone.simulate import SimSettings, Simulation, SimulationError
from softrelay.cli import main
from softrelay.simulate import embedded_world

USERS = 4
SETTINGS = SimSettings(
    phones=6,
    duration=8.0,
    call_rate=0.5,
    sleep_rate=0.0,
    contacts=USERS / 6,
    contacts_rate=1.0,
    mix={Kind.IOS: 1, Kind.ANDROID: 1},
    answers={Answer.ANSWER: 1},
    seed=23,
)


async def test_contacts_users_sync_their_books_and_find_each_other(tmp_path: Path) -> None:
    world = await embedded_world(SETTINGS, tmp_path)
    try:
        simulation = Simulation(SETTINGS, world, asyncio.Event(), pace=SteppedPace())
        stats = await simulation.run()
        events = Counter(kind for _, kind in simulation.events())
    finally:
        await world.close()
    summary = stats.summary(SETTINGS)
    assert summary["registrations"] == {"ok": 6, "failed": {}}
    contacts = summary["contacts"]
    edits = events["contacts"]
    assert edits > 0, "the seed draws contacts events"
    assert contacts["ok"] is True, contacts
    assert contacts["errors"] == {}
    # The users are the first relay-mode phones, their SIP names phone numbers.
    numbers = {u.number for u in simulation.contacts.users}
    assert len(numbers) == USERS
    assert numbers <= {user_number(i) for i in range(SETTINGS.phones)}
    assert (contacts["users"], contacts["devices"], contacts["discoverable"]) == (4, 8, 4)
    # Set-up per user: three writes (one after a 412 and a merge), two read-backs, two
    # discoveries; each event: one of each.
    assert contacts["books"] == {
        "written": 3 * USERS + edits,
        "conflicts_merged": USERS,
        "read_back": 2 * USERS + edits,
        "mismatches": 0,
    }
    found = contacts["discovery"]
    assert found["runs"] == 2 * USERS + edits
    # A book at set-up: the 3 other users, the strangers and one contact added on each
    # device; the first run sends them all, the second none; an event sends at most its
    # new number.
    first_book = USERS - 1 + BOOK_STRANGERS + 2
    assert USERS * first_book <= found["sent"] <= USERS * first_book + edits
    assert found["matched"] >= 2 * USERS * (USERS - 1)
    assert (found["wrong_matches"], found["unexpected_sends"], found["deferred"]) == (0, 0, 0)


def test_contacts_options_and_scenario_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "contacts.toml"
    scenario.write_text("[behaviour]\ncontacts = 0.5\ncontacts_rate = 0.2\n", encoding="utf-8")
    settings = load_scenario(scenario)
    assert (settings.contacts, settings.contacts_rate) == (0.5, 0.2)
    scenario.write_text("[behaviour]\ncontacts = 1.5\n", encoding="utf-8")
    with pytest.raises(SimulationError, match="contacts must be between 0 and 1"):
        load_scenario(scenario)
    assert main(["simulate", "--embedded", "--contacts", "-0.1"]) == 2
    assert "contacts must be between 0 and 1" in capsys.readouterr().err
    assert main(["simulate", "--embedded", "--contacts-rate", "-1"]) == 2
    assert "contacts-rate must not be negative" in capsys.readouterr().err
