"""proxy/protect/crypto.py: AES-256-GCM with the key id in the value, place bound as AD."""

import os

import pytest

from proxy.protect.crypto import (
    HASH,
    MAGIC,
    STRING,
    Cipher,
    NotCiphertext,
    Tampered,
    UnknownKey,
    associated,
    is_ciphertext,
    key_id_of,
)


def cipher(primary: str = "k1", *ids: str) -> Cipher:
    return Cipher({key_id: os.urandom(32) for key_id in (primary, *ids)}, primary)


def test_round_trip_and_the_value_never_appears_in_the_ciphertext() -> None:
    c = cipher()
    ad = associated(STRING, b"app:phi:patient:1")
    secret = b"MRN 12345, diagnosis: ..."
    blob = c.encrypt(secret, ad)
    assert blob.startswith(MAGIC) and is_ciphertext(blob) and key_id_of(blob) == "k1"
    assert secret not in blob and c.decrypt(blob, ad) == secret
    assert c.encrypt(secret, ad) != blob  # a fresh nonce each time


def test_a_value_copied_to_another_key_or_field_does_not_decrypt() -> None:
    c = cipher()
    blob = c.encrypt(b"v", associated(STRING, b"app:phi:a"))
    with pytest.raises(Tampered):
        c.decrypt(blob, associated(STRING, b"app:phi:b"))
    field = c.encrypt(b"v", associated(HASH, b"app:phi:h", b"dob"))
    with pytest.raises(Tampered):
        c.decrypt(field, associated(HASH, b"app:phi:h", b"name"))
    with pytest.raises(Tampered):  # the same place as another kind of value
        c.decrypt(blob, associated(HASH, b"app:phi:a", b""))


def test_a_changed_byte_anywhere_is_refused() -> None:
    c = cipher()
    ad = associated(STRING, b"k")
    blob = c.encrypt(b"value", ad)
    header = len(MAGIC) + 1 + len("k1")
    for i in range(header, len(blob)):
        changed = blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:]
        with pytest.raises(Tampered):
            c.decrypt(changed, ad)


def test_rotation_old_keys_still_decrypt_new_writes_use_the_primary() -> None:
    keys = {"k1": os.urandom(32), "k2": os.urandom(32)}
    old = Cipher(keys, "k1").encrypt(b"x", b"ad")
    new = Cipher(keys, "k2")
    assert new.decrypt(old, b"ad") == b"x" and new.needs_rewrap(old)
    assert key_id_of(new.encrypt(b"x", b"ad")) == "k2"
    removed = Cipher({"k2": keys["k2"]}, "k2")
    with pytest.raises(UnknownKey) as exc:
        removed.decrypt(old, b"ad")
    assert exc.value.key_id == "k1"


def test_plaintext_and_truncated_values_are_not_ciphertext() -> None:
    c = cipher()
    for value in (b"", b"plain text", MAGIC, MAGIC + b"\x02k1" + b"short"):
        with pytest.raises(NotCiphertext):
            c.decrypt(value, b"ad")


def test_bad_keyrings_are_refused() -> None:
    with pytest.raises(ValueError, match="primary"):
        Cipher({"a": os.urandom(32)}, "b")
    with pytest.raises(ValueError, match="32"):
        Cipher({"a": os.urandom(16)}, "a")


def test_nonces_are_never_reused_and_a_forked_worker_does_not_share_them() -> None:
    from proxy.protect import crypto

    seen = {crypto._nonce() for _ in range(2000)}  # across several batches
    assert len(seen) == 2000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first nonce, to the parent
        os.write(write, crypto._nonce())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64)
    os.close(read)
    os.close(write)
    assert len(child) == 12 and child != crypto._nonce()  # not the parent's next one
