"""Field encryption (AES-GCM) and blind indexes (keyed HMAC) for the store.

A ciphertext is `key id (2 bytes, big-endian) || nonce (12 bytes) || AES-GCM output`.
The associated data binds it to its category and field, so a ciphertext moved into
another column does not decrypt. A blind index is an HMAC-SHA256 of the value under the
index key, scoped by category and field, truncated to 16 bytes: equality look-ups work,
the value does not show, and equal values in different places do not correlate.
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
_INDEX_BYTES = 16


class DecryptionError(Exception):
    """A ciphertext that no key of the keyring opens: wrong key, or tampered data."""


class FieldCipher:
    def __init__(self, keyring: Keyring) -> None:
        self._active = keyring.active
        self._aead = {kid: AESGCM(key) for kid, key in keyring.encryption.items()}
        # Keyed once: HMAC key set-up per index was a measurable part of each write.
        self._index_mac = hmac.new(keyring.index, digestmod="sha256")

    def encrypt(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        sealed = self._aead[self._active].encrypt(nonce, plaintext, context)
        return _KID.pack(self._active) + nonce + sealed

    def decrypt(self, blob: bytes, context: bytes) -> bytes:
        (kid,) = _KID.unpack_from(blob)
        aead = self._aead.get(kid)
        if aead is None:
            raise DecryptionError(f"no key with id {kid} in the keyring")
        nonce = blob[_KID.size : _KID.size + _NONCE]
        try:
            return aead.decrypt(nonce, blob[_KID.size + _NONCE :], context)
        except InvalidTag:
            raise DecryptionError("ciphertext does not open with its key") from None

    @staticmethod
    def key_id(blob: bytes) -> int:
        kid: int = _KID.unpack_from(blob)[0]
        return kid

    def blind_index(self, scope: bytes, value: bytes) -> bytes:
        mac = self._index_mac.copy()
        mac.update(scope + b"\x1f" + value)
        return mac.digest()[:_INDEX_BYTES]
