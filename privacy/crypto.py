"""Field encryption (AES-GCM) and blind indexes (keyed HMAC) for the store.

A ciphertext is bound by its associated data to where it may be read:

- version 2 (written now): `00 00 02 || key id (2 bytes, big-endian) || nonce (12 bytes)
  || AES-GCM output`, with the associated data `category.field || 0x1e || row`, where
  `row` names the record (privacy/store.py: its record key, or the random row id drawn
  at its insert). A ciphertext copied into another column or another row does not open.
- version 1 (databases written before the row binding): `key id || nonce || AES-GCM
  output`, bound to `category.field` only. Still read, so existing data keeps working;
  the store writes version 2 whenever it writes a field, and `Store.reseal` rewrites
  every older ciphertext at once (run it after a key rotation, then drop the old key:
  only that closes the window for version-1 ciphertexts to be swapped between rows).

Key id 0 is never a key (the keyring refuses it), so the two versions cannot be
confused. A blind index is an HMAC-SHA256 of the value under the index key, scoped by
category and field, truncated to 16 bytes: equality look-ups work, the value does not
show, and equal values in different places do not correlate.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.keys import Keyring

_KID = struct.Struct(">H")
_NONCE = 12
_TAG = 16
_INDEX_BYTES = 16
V2 = b"\x00\x00\x02"  # key id 0, then the version: what no version-1 ciphertext starts with
_ROW_SEPARATOR = b"\x1e"  # category and field names are identifiers: never in a context


class DecryptionError(Exception):
    """A ciphertext that no key of the keyring opens here: wrong key, tampered data, or
    moved from another column or row."""


class FieldCipher:
    def __init__(self, keyring: Keyring) -> None:
        self._active = keyring.active
        self._aead = {kid: AESGCM(key) for kid, key in keyring.encryption.items()}
        # Keyed once: HMAC key set-up per index was a measurable part of each write.
        self._index_mac = hmac.new(keyring.index, digestmod="sha256")

    @property
    def active_key(self) -> int:
        return self._active

    def encrypt(self, plaintext: bytes, context: bytes, *, row: bytes) -> bytes:
        """Seal for this field (`context`) of this record (`row`) only."""
        nonce = os.urandom(_NONCE)
        sealed = self._aead[self._active].encrypt(nonce, plaintext, _v2_data(context, row))
        return V2 + _KID.pack(self._active) + nonce + sealed

    def decrypt(self, blob: bytes, context: bytes, *, row: bytes) -> bytes:
        if blob.startswith(V2):
            start, data = len(V2), _v2_data(context, row)
        else:
            start, data = 0, context  # version 1: bound to the field only
        if len(blob) < start + _KID.size + _NONCE + _TAG:
            raise DecryptionError("ciphertext is too short")
        (kid,) = _KID.unpack_from(blob, start)
        aead = self._aead.get(kid)
        if aead is None:
            raise DecryptionError(f"no key with id {kid} in the keyring")
        nonce_at = start + _KID.size
        nonce = blob[nonce_at : nonce_at + _NONCE]
        try:
            return aead.decrypt(nonce, blob[nonce_at + _NONCE :], data)
        except InvalidTag:
            raise DecryptionError("ciphertext does not open here") from None

    @staticmethod
    def key_id(blob: bytes) -> int:
        kid: int = _KID.unpack_from(blob, len(V2) if blob.startswith(V2) else 0)[0]
        return kid

    @staticmethod
    def version(blob: bytes) -> int:
        return 2 if blob.startswith(V2) else 1

    def blind_index(self, scope: bytes, value: bytes) -> bytes:
        mac = self._index_mac.copy()
        mac.update(scope + b"\x1f" + value)
        return mac.digest()[:_INDEX_BYTES]


def _v2_data(context: bytes, row: bytes) -> bytes:
    return context + _ROW_SEPARATOR + row
