"""Issue 14, point 3: a parked call goes only to its own phone.

A push token (`pn-prid`) is no secret: a PBX, the push provider and an old phone all
see it. A call parked for Bob is released only by a REGISTER that Bob's PBX accepted
(its 200, not the request) for Bob at that PBX, with his token and, when the parked
binding named one, his `+sip.instance`. Another user of the same PBX who registers
with Bob's token gets nothing; Bob, back, gets his call.
"""

from __future__ import annotations

import pytest

from tests.security import wake_world as ww
from tests.security.wake_world import (
    BOB_INSTANCE,
    OTHER_INSTANCE,
    Linked,
    contact,
    pbx_answers,
    register,
    requests,
    send_register,
)
from tests.sip import test_wake as wake

world = ww.world
linked = ww.linked


async def _bob_asleep_with_a_parked_call(linked: Linked, instance: str | None) -> None:
    """Bob registered (with `instance`), slept, and a call for him is parked."""
    bob, _, registered = await register(
        linked, user="bob", contact=contact("bob", instance=instance), cseq=1
    )
    bob.close()
    await linked.world.relay.handle(wake._invite(registered, user="bob"), linked.pbx)
    await linked.pbx_wire.response(180)
    assert len(linked.world.relay.parking) == 1


async def _bob_is_back(linked: Linked, instance: str | None, cseq: int) -> None:
    _, bob_wire, _ = await register(
        linked, user="bob", contact=contact("bob", instance=instance), cseq=cseq
    )
    invite = await bob_wire.request("INVITE")
    assert invite.call_id == "call-1"
    assert len(linked.world.relay.parking) == 0


@pytest.mark.parametrize(
    ("bob_instance", "mallory_instance"),
    [
        (None, None),
        (None, OTHER_INSTANCE),
        (BOB_INSTANCE, None),
        (BOB_INSTANCE, BOB_INSTANCE),
        (BOB_INSTANCE, OTHER_INSTANCE),
    ],
)
async def test_another_user_of_the_pbx_with_bobs_token_does_not_get_his_parked_call(
    linked: Linked, bob_instance: str | None, mallory_instance: str | None
) -> None:
    await _bob_asleep_with_a_parked_call(linked, bob_instance)
    # Mallory has an account on the same PBX, which accepts her REGISTER: its Contact
    # carries Bob's pn-prid (and Bob's instance, or her own, or none).
    _, mallory_wire, _ = await register(
        linked,
        user="mallory",
        contact=contact("mallory", instance=mallory_instance, port=5099),
        cseq=2,
    )
    assert requests(mallory_wire) == [], "nothing of Bob's call reached Mallory"
    assert len(linked.world.relay.parking) == 1, "the call still waits for Bob"
    await _bob_is_back(linked, bob_instance, cseq=3)
    assert requests(mallory_wire) == []


@pytest.mark.parametrize("other_instance", [None, OTHER_INSTANCE])
async def test_a_binding_with_an_instance_is_released_only_to_that_instance(
    linked: Linked, other_instance: str | None
) -> None:
    await _bob_asleep_with_a_parked_call(linked, BOB_INSTANCE)
    # Another device of Bob's own account presents the parked binding's token.
    _, other_wire, _ = await register(
        linked, user="bob", contact=contact("bob", instance=other_instance, port=5070), cseq=2
    )
    assert requests(other_wire) == []
    assert len(linked.world.relay.parking) == 1
    await _bob_is_back(linked, BOB_INSTANCE, cseq=3)


async def test_a_binding_without_an_instance_is_released_to_its_user_whatever_the_instance(
    linked: Linked,
) -> None:
    await _bob_asleep_with_a_parked_call(linked, None)
    await _bob_is_back(linked, BOB_INSTANCE, cseq=2)


@pytest.mark.parametrize(("status", "reason"), [(401, "Unauthorized"), (403, "Forbidden")])
async def test_only_the_pbxs_200_releases_the_call_not_the_register_itself(
    linked: Linked, status: int, reason: str
) -> None:
    await _bob_asleep_with_a_parked_call(linked, BOB_INSTANCE)
    phone, phone_wire = wake._flow(("198.51.100.23", 41000))
    bobs = contact("bob", instance=BOB_INSTANCE)
    forwarded = await send_register(linked, phone, user="bob", contact=bobs, cseq=2)
    assert requests(phone_wire) == [], "a REGISTER the PBX has not accepted releases nothing"
    await pbx_answers(linked, forwarded, status, reason)
    await phone_wire.response(status, "REGISTER")
    assert requests(phone_wire) == []
    assert len(linked.world.relay.parking) == 1
    forwarded = await send_register(linked, phone, user="bob", contact=bobs, cseq=3)
    await pbx_answers(linked, forwarded, 200, "OK")
    invite = await phone_wire.request("INVITE")
    assert invite.call_id == "call-1"
