"""Value encryption: AES-256-GCM with the key id in the ciphertext and the value's place
(key name, hash field, ...) bound as associated data.

A stored value is `MAGIC | len(key id) | key id | nonce (12) | ciphertext | tag (16)`.
MAGIC starts with a NUL byte, which no text value starts with, so a plaintext value written
before protection was turned on is told from ciphertext by its first bytes (and then
refused or passed, `[encryption] plaintext_reads`). The key id names the data-encryption
key in the keyring: keys rotate without downtime (new writes use the primary; reads use
whatever key the value names; `keys rewrap` moves old values to the primary).

Associated data binds a value to where it may be read: a string value to its key name, a
hash field value to key name and field, a stream field value to key name and field name.
A value copied elsewhere by someone with direct Redis access fails to decrypt there (an
error, never another patient's data). List elements are bound to the `[[protect]]` rule
that covers their list instead of the list's name: queue patterns move elements between
lists (LMOVE, RPOPLPUSH, BLMOVE), which Redis does without the proxy seeing the element,
so an element must decrypt in any list of its rule (and moves to a list under another rule
or none are refused).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"\x00PHI\x01"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
_AD_PREFIX = b"phiproxy/v1\x00"

STRING, HASH, LIST, STREAM = b"string", b"hash", b"list", b"stream"


class DecryptError(Exception):
    """A stored protected value that cannot be turned back into plaintext."""


class NotCiphertext(DecryptError):
    """The stored value is not ciphertext (written before protection, or by someone else)."""


class UnknownKey(DecryptError):
    """The value names a key id the keyring does not have (removed, or another keyring)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"key id {key_id!r} is not in the keyring")
        self.key_id = key_id


class Tampered(DecryptError):
    """The tag does not verify: the value was changed, or copied from another place."""


# Random 96-bit nonces, read from the kernel 4 KiB at a time (one getrandom per 341
# values, not one per value) and never handed out twice. A forked worker must not share
# its parent's unused ones: the buffer is emptied in the child.
_NONCE_BATCH = NONCE_BYTES * 341
_buf = b""
_pos = 0


def _nonce() -> bytes:
    global _buf, _pos
    pos = _pos
    if pos + NONCE_BYTES > len(_buf):
        _buf = os.urandom(_NONCE_BATCH)
        pos = 0
    _pos = pos + NONCE_BYTES
    return _buf[pos:pos + NONCE_BYTES]


def _forget_nonces() -> None:
    global _buf, _pos
    _buf, _pos = b"", 0


os.register_at_fork(after_in_child=_forget_nonces)


def associated(kind: bytes, place: bytes, field: bytes = b"") -> bytes:
    """The associated data of a value: what it is (string, hash, list, stream), where
    (the key name, or the rule for list elements) and, for hashes and streams, its field."""
    return b"".join((_AD_PREFIX, kind, b"\x00", place, b"\x00", field))


def is_ciphertext(value: bytes) -> bool:
    return value.startswith(MAGIC)


def key_id_of(value: bytes) -> str | None:
    """The key id a ciphertext names, or None if it is not one."""
    if not value.startswith(MAGIC) or len(value) <= len(MAGIC):
        return None
    size = value[len(MAGIC)]
    start = len(MAGIC) + 1
    if len(value) < start + size + NONCE_BYTES + TAG_BYTES:
        return None
    return value[start:start + size].decode("ascii", "replace")


class Cipher:
    """The keyring's keys, ready to use: encrypt under the primary, decrypt under any."""

    def __init__(self, keys: dict[str, bytes], primary: str) -> None:
        if primary not in keys:
            raise ValueError(f"primary key id {primary!r} is not among the keys")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs 32")
            if not key_id or len(key_id.encode()) > 255 or not key_id.isascii():
                raise ValueError(f"key id {key_id!r} must be 1-255 ASCII characters")
        self.primary = primary
        self._aead = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._header = MAGIC + bytes([len(primary)]) + primary.encode("ascii")
        self._primary = self._aead[primary]

    @property
    def key_ids(self) -> list[str]:
        return list(self._aead)

    def encrypt(self, plaintext: bytes, ad: bytes) -> bytes:
        nonce = _nonce()
        return self._header + nonce + self._primary.encrypt(nonce, plaintext, ad)

    def decrypt(self, value: bytes, ad: bytes) -> bytes:
        header = self._header
        start = len(header)
        if value.startswith(header) and len(value) >= start + NONCE_BYTES + TAG_BYTES:
            # under the primary key: the common case
            try:
                return self._primary.decrypt(value[start:start + NONCE_BYTES],
                                             value[start + NONCE_BYTES:], ad)
            except InvalidTag:
                pass  # reported below, with the key id
        key_id = key_id_of(value)
        if key_id is None:
            raise NotCiphertext("not a phiproxy ciphertext")
        aead = self._aead.get(key_id)
        if aead is None:
            raise UnknownKey(key_id)
        start = len(MAGIC) + 1 + len(key_id)
        nonce = value[start:start + NONCE_BYTES]
        try:
            return aead.decrypt(nonce, value[start + NONCE_BYTES:], ad)
        except InvalidTag:
            raise Tampered(f"value under key id {key_id!r} does not verify here "
                           "(changed, or copied from another key or field)") from None

    def needs_rewrap(self, value: bytes) -> bool:
        """A ciphertext under another key than the primary (keys rewrap moves it)."""
        key_id = key_id_of(value)
        return key_id is not None and key_id != self.primary
