"""Tokens name the node that made them, sealed with the rest (proxy/sip/tokens.py): a
node opens only its own, whatever key another node shares or a peer claims."""

from __future__ import annotations

from proxy.sip.flow import Flow, Transport
from proxy.sip.tokens import Sealer, node_of

KEY = bytes(range(32))


class _Quiet:
    async def send(self, data: bytes) -> None:
        raise AssertionError("nothing is sent")

    def close(self) -> None:
        pass


def _flow() -> Flow:
    return Flow(Transport.TCP, ("198.51.100.7", 5060), ("127.0.0.1", 5060), _Quiet())


def test_a_path_token_opens_only_on_the_node_that_made_it_even_with_the_same_key() -> None:
    phone = _flow()
    token = Sealer(KEY, "node-a").path_token(phone, "0042137")
    assert node_of(token) == "node-a"
    assert Sealer(KEY, "node-a").open_path(token, "0042137") == phone.id
    assert Sealer(KEY, "node-b").open_path(token, "0042137") is None
    # Renamed to another node: its seal names node-a, so node-b cannot open it either.
    renamed = token.rpartition(".")[0] + ".node-b"
    assert Sealer(KEY, "node-b").open_path(renamed, "0042137") is None
    # Without its node: nobody's, in a cluster or outside one.
    bare = token.rpartition(".")[0]
    assert Sealer(KEY, "node-a").open_path(bare, "0042137") is None
    assert Sealer(KEY).open_path(bare, "0042137") is None
    assert Sealer(KEY).open_path(token, "0042137") is None


def test_a_dialog_token_opens_only_on_the_node_that_made_it() -> None:
    pbx, phone = _flow(), _flow()
    token = Sealer(KEY, "node-a").dialog_token(pbx, phone, "0042137")
    assert node_of(token) == "node-a"
    dialog = Sealer(KEY, "node-a").open_dialog(token)
    assert dialog is not None
    assert (dialog.pbx.flow_id, dialog.phone.flow_id, dialog.serial) == (
        pbx.id,
        phone.id,
        "0042137",
    )
    assert Sealer(KEY, "node-b").open_dialog(token) is None
    assert Sealer(KEY, "node-b").open_dialog(token.rpartition(".")[0] + ".node-b") is None
    assert Sealer(KEY).open_dialog(token) is None


def test_outside_a_cluster_tokens_are_as_before() -> None:
    """No node: no suffix, and the seal of the single process is unchanged."""
    phone = _flow()
    token = Sealer(KEY).path_token(phone, "0042137")
    assert "." not in token
    assert node_of(token) == ""
    assert Sealer(KEY).open_path(token, "0042137") == phone.id
    assert Sealer(KEY, "node-a").open_path(token, "0042137") is None
