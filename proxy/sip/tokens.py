"""What softrelay writes into messages to find its way back, sealed with a key of the
process, so that a peer can use a value only from where it was meant to be used.

- Branch (our Via's `branch`): stateless as RFC 3261 16.11 asks (a retransmission or
  the CANCEL of a request gets the same one), then a seal of the flow the request came
  from and the flow it went to. A response is routed only when it arrives on that flow:
  nobody else can answer a request for the peer it was sent to.
- Path token (`ft` in the Path of a phone's REGISTER): the phone's flow, usable only by
  the PBX of the serial the REGISTER went to.
- Dialog token (`dt` in our Record-Route): both ends of a dialog and the PBX's serial;
  only those ends, or the PBX of that serial on a new flow, can use it.

In a cluster every token names the node that made it (`.<node id>` at its end, sealed
with the rest): a node opens only its own; one naming another node is that node's to
open (the relay forwards it there, `node_of`), and one naming none is nobody's.

A flow is named in a seal by `Flow.key`: its connection for a stream, its (socket,
remote address) pair for UDP. The seals are keyed BLAKE2s (a keyed hash made to be a
MAC; with its keyed state made once and copied, a third of HMAC-SHA-256's time for
these short inputs in CPython), 64 bits each: a guess costs a message, so 2^64 of them
is out of reach.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import struct
from functools import lru_cache
from typing import NamedTuple

from proxy.sip.flow import Address, Flow, Transport

MAGIC = "z9hG4bK"
_HALF = 16  # hex digits of each half of a branch
BRANCH_LENGTH = len(MAGIC) + 2 * _HALF
_MAC = 8  # bytes of every seal
_ID = struct.Struct(">Q")
_PORT = struct.Struct(">H")


class End(NamedTuple):
    """One end of a dialog: its flow's id, and for UDP the peer's address as well, which
    names the flow even after the Flow object was forgotten and made again."""

    flow_id: int
    remote: Address | None  # UDP only

    def is_(self, flow: Flow) -> bool:
        if flow.id == self.flow_id:
            return True
        return (
            self.remote is not None
            and flow.transport is Transport.UDP
            and (flow.remote == self.remote)
        )


class Dialog(NamedTuple):
    pbx: End
    phone: End
    serial: str


class Sealer:
    def __init__(self, key: bytes, node: str = "") -> None:
        self._keyed = hashlib.blake2s(key=key, digest_size=_MAC)  # at most 32 bytes
        self.node = node  # "" outside a cluster: tokens then are as they always were

    @property
    def _suffix(self) -> str:
        return "." + self.node if self.node else ""

    @property
    def _sealed_node(self) -> bytes:
        return b"\0" + self.node.encode() if self.node else b""

    def _own(self, token: str) -> str | None:
        """The token without its node, if it names this node (no node outside a cluster)."""
        body, dot, node = token.rpartition(".")
        if not dot:
            return None if self.node else token
        return body if node == self.node and self.node else None

    def _hash(self, data: bytes) -> hashlib.blake2s:
        keyed = self._keyed.copy()
        keyed.update(data)
        return keyed

    def _mac(self, data: bytes) -> bytes:
        return self._hash(data).digest()

    # --- branches -----------------------------------------------------------------

    def branch(self, transaction: bytes, came_from: Flow, target: Flow) -> str:
        """Our branch for a request: `transaction` names it (the same for its
        retransmissions and its CANCEL), then the seal of where it goes."""
        first = self._hash(b"T" + transaction + b"\0" + came_from.key).hexdigest()
        return MAGIC + first + self._branch_seal(first, came_from, target)

    def answers_branch(self, branch: str, came_from: Flow, arrived: Flow) -> bool:
        """Whether a response with our `branch` may come on `arrived`: the flow its
        request was sent to (from `came_from`)."""
        if len(branch) != BRANCH_LENGTH or not branch.isascii() or not branch.startswith(MAGIC):
            return False
        first = branch[len(MAGIC) : len(MAGIC) + _HALF]
        expected = self._branch_seal(first, came_from, arrived)
        return hmac.compare_digest(expected, branch[len(MAGIC) + _HALF :])

    def _branch_seal(self, first: str, came_from: Flow, target: Flow) -> str:
        data = b"B" + first.encode() + b"\0" + came_from.key + b"\0" + target.key
        return self._hash(data).hexdigest()

    # --- flow tokens --------------------------------------------------------------

    def flow_token(self, flow_id: int) -> str:
        """A flow's token (our Via's `ft`): its id and a seal of it. The relay finds the
        flow by the whole token in a dict, so only a token it made finds one."""
        raw = _ID.pack(flow_id)
        return _encode(raw + self._mac(b"F" + raw + self._sealed_node)) + self._suffix

    # --- Path tokens --------------------------------------------------------------

    def path_token(self, phone: Flow, serial: str) -> str:
        raw = _ID.pack(phone.id)
        mac = self._mac(b"P" + raw + serial.encode() + self._sealed_node)
        return _encode(raw + mac) + self._suffix

    def open_path(self, token: str, serial: str) -> int | None:
        """The phone flow's id in a Path token, if it was made for `serial` (here)."""
        own = self._own(token)
        raw = None if own is None else _decode(own)
        if raw is None or len(raw) != _ID.size + _MAC:
            return None
        body, mac = raw[: _ID.size], raw[_ID.size :]
        expected = self._mac(b"P" + body + serial.encode() + self._sealed_node)
        if not hmac.compare_digest(mac, expected):
            return None
        flow_id: int = _ID.unpack(body)[0]
        return flow_id

    # --- dialog tokens ------------------------------------------------------------

    def dialog_token(self, pbx: Flow, phone: Flow, serial: str) -> str:
        return self.seal_dialog(pbx, phone, serial)[0]

    def seal_dialog(self, pbx: Flow, phone: Flow, serial: str) -> tuple[str, Dialog]:
        """The dialog token, and the dialog `open_dialog` reads from it (so the relay
        need not open the tokens it made: a new UDP flow per call, a new token)."""
        body = _end(pbx) + _end(phone) + serial.encode()
        token = _encode(self._mac(b"D" + body + self._sealed_node) + body) + self._suffix
        return token, _read_dialog(body)

    def open_dialog(self, token: str) -> Dialog | None:
        own = self._own(token)
        raw = None if own is None else _decode(own)
        if raw is None or len(raw) <= _MAC:
            return None
        mac, body = raw[:_MAC], raw[_MAC:]
        if not hmac.compare_digest(mac, self._mac(b"D" + body + self._sealed_node)):
            return None
        return _read_dialog(body)  # ours, so well formed: what we wrote is read back


def _read_dialog(body: bytes) -> Dialog:
    pbx, rest = _read_end(body)
    phone, rest = _read_end(rest)
    return Dialog(pbx, phone, rest.decode())


def node_of(token: str) -> str:
    """The node a token names ("" for none): the text after its last dot."""
    return token.rpartition(".")[2] if "." in token else ""


# Parsing an address costs more than the seal; the same few hosts come back call after
# call (bounded: a flood of new sources only evicts, at the cost of parsing again).
@lru_cache(maxsize=4096)
def _packed(host: str) -> bytes:
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        return b""  # not an address (an in-process flow): known by its id alone


@lru_cache(maxsize=4096)
def _unpacked(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _end(flow: Flow) -> bytes:
    packed = _packed(flow.remote[0]) if flow.transport is Transport.UDP else b""
    if not packed:
        return b"s" + _ID.pack(flow.id)
    return b"u" + _ID.pack(flow.id) + bytes((len(packed),)) + packed + _PORT.pack(flow.remote[1])


def _read_end(data: bytes) -> tuple[End, bytes]:
    flow_id: int = _ID.unpack_from(data, 1)[0]
    if data[:1] == b"s":
        return End(flow_id, None), data[1 + _ID.size :]
    at = 1 + _ID.size
    size = data[at]
    host = _unpacked(data[at + 1 : at + 1 + size])
    port: int = _PORT.unpack_from(data, at + 1 + size)[0]
    return End(flow_id, (host, port)), data[at + 1 + size + _PORT.size :]


def _encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def _decode(token: str) -> bytes | None:
    if not token.isascii():
        return None
    try:
        return base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except (binascii.Error, ValueError):
        return None
