"""The keyring file: data-encryption keys by id, one of them primary (SPEC §9).

    {"version": 1, "primary": "k-20261202-1a2b",
     "keys": {"k-20261202-1a2b": "<base64 of 32 random bytes>", ...}}

A secret like every other: mode 0600, refused otherwise. Every error names the file and
what is wrong, never the key material. Writes are atomic (a 0600 temp file in the same
directory, fsync, rename, fsync of the directory), so a crash leaves the old keyring or the
new one, never half of one, and a running proxy's SIGHUP never reads a partial file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from proxy.protect.crypto import KEY_BYTES, Cipher

VERSION = 1


class KeyringError(Exception):
    """The keyring cannot be used; the message names the file and the fix."""


def new_key_id(taken: set[str] | frozenset[str] = frozenset()) -> str:
    """`k-YYYYMMDD-xxxx`: the day it was made (operators see a key's age at a glance) and
    random hex, so two keys made the same day differ."""
    day = time.strftime("%Y%m%d", time.gmtime())
    while True:
        key_id = f"k-{day}-{secrets.token_hex(2)}"
        if key_id not in taken:
            return key_id


def read_keyring(path: Path) -> tuple[str, dict[str, bytes]]:
    """(primary id, {id: key}) from the file; KeyringError naming the file otherwise."""
    from proxy.config import check_secret_file

    problem = check_secret_file(path)
    if problem is not None:
        raise KeyringError(problem)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise KeyringError(f"{path} cannot be read ({e.strerror}); give this user read "
                           "access") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        # the parser's message may quote the file's content: it is a secret, say only where
        raise KeyringError(f"{path} is not a phiproxy keyring (not valid JSON); create one "
                           "with: phiproxy keys new --out FILE") from None
    return _parse(path, doc)


def _parse(path: Path, doc: Any) -> tuple[str, dict[str, bytes]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
        raise KeyringError(f"{path} is not a phiproxy keyring (a JSON object with \"version\", "
                           "\"primary\" and \"keys\" is expected); create one with: phiproxy "
                           "keys new --out FILE")
    if doc.get("version") != VERSION:
        raise KeyringError(f"{path}: \"version\" is {json.dumps(doc.get('version'))}; this "
                           f"phiproxy reads version {VERSION}")
    unknown = sorted(set(doc) - {"version", "primary", "keys"})
    if unknown:
        raise KeyringError(f"{path}: unknown field(s) {', '.join(unknown)}; a keyring has "
                           "version, primary and keys only")
    keys: dict[str, bytes] = {}
    for key_id, encoded in doc["keys"].items():
        if not key_id or not key_id.isascii() or len(key_id) > 255 or not key_id.isprintable():
            raise KeyringError(f"{path}: key id {json.dumps(key_id)} must be 1-255 printable "
                               "ASCII characters")
        try:
            key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise KeyringError(f"{path}: key {key_id!r} is not the base64 of {KEY_BYTES} bytes "
                               "(AES-256); restore it from your backup of the keyring")
        keys[key_id] = key
    if not keys:
        raise KeyringError(f"{path} holds no key; add one with: phiproxy keys add -c CONFIG")
    primary = doc.get("primary")
    if not isinstance(primary, str) or primary not in keys:
        raise KeyringError(f"{path}: \"primary\" is {json.dumps(primary)}, which is not one of "
                           f"its keys ({', '.join(keys)}); set it to the id of the key new "
                           "values are written under")
    return primary, keys


def load_keyring(path: Path) -> Cipher:
    """The keyring as a Cipher (encrypt under the primary, decrypt under any key)."""
    primary, keys = read_keyring(path)
    return Cipher(keys, primary)


def _encode(primary: str, keys: dict[str, bytes]) -> bytes:
    doc = {"version": VERSION, "primary": primary,
           "keys": {key_id: base64.b64encode(key).decode("ascii")
                    for key_id, key in keys.items()}}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _write_temp(path: Path, data: bytes) -> Path:
    """A new 0600 file next to `path` with `data`, synced to disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _sync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_keyring(path: Path) -> str:
    """A new keyring at `path` with one random primary key; its id. Never overwrites:
    FileExistsError if `path` exists (even if it appears meanwhile: the final step is a
    link, which fails on an existing name)."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(path)
    key_id = new_key_id()
    tmp = _write_temp(path, _encode(key_id, {key_id: secrets.token_bytes(KEY_BYTES)}))
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    _sync_dir(path)
    return key_id


def add_key(path: Path) -> tuple[str, list[str]]:
    """Add a random key to the keyring at `path` and make it primary, keeping every old key
    (values under them stay readable until `keys rewrap` moved them). Returns the new id and
    the ids kept."""
    _, keys = read_keyring(path)
    key_id = new_key_id(set(keys))
    kept = list(keys)
    keys[key_id] = secrets.token_bytes(KEY_BYTES)
    tmp = _write_temp(path, _encode(key_id, keys))
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_dir(path)
    return key_id, kept
