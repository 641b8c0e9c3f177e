"""The keyring file, `[encryption]` / `[[protect]]` configuration, `phiproxy keys new|add`."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path

import pytest

from proxy.certs import write_dev_pki
from proxy.cli import main
from proxy.config import ConfigError, load_config
from proxy.protect.crypto import STRING, associated
from proxy.protect.keyring import KeyringError, add_key, create_keyring, load_keyring
from tests.unit.test_config import _secret, dump_toml, full_doc

KEY_ID = re.compile(r"k-\d{8}-[0-9a-f]{4}")


def _keyring(path: Path, doc: object, mode: int = 0o600) -> Path:
    _secret(path, json.dumps(doc).encode(), mode)
    return path


def _good(primary: str = "k1", *others: str) -> dict:
    keys = {k: base64.b64encode(os.urandom(32)).decode() for k in (primary, *others)}
    return {"version": 1, "primary": primary, "keys": keys}


# --- the file ---------------------------------------------------------------------------


def test_new_keyring_is_0600_with_one_primary_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    key_id = create_keyring(path)
    assert KEY_ID.fullmatch(key_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["primary"] == key_id and list(doc["keys"]) == [key_id]
    cipher = load_keyring(path)
    ad = associated(STRING, b"app:phi:1")
    assert cipher.primary == key_id and cipher.decrypt(cipher.encrypt(b"x", ad), ad) == b"x"


def test_new_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        create_keyring(path)
    assert path.read_text() == "precious"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_add_makes_a_new_primary_and_keeps_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    first = create_keyring(path)
    old = load_keyring(path)
    ad = associated(STRING, b"app:phi:1")
    blob = old.encrypt(b"before rotation", ad)
    second, kept = add_key(path)
    assert second != first and kept == [first]
    new = load_keyring(path)
    assert new.primary == second and set(new.key_ids) == {first, second}
    assert new.decrypt(blob, ad) == b"before rotation" and new.needs_rewrap(blob)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]


@pytest.mark.parametrize(("doc", "words"), [
    ("not json {", "not valid JSON"),
    ([1, 2], "not a phiproxy keyring"),
    ({"version": 2, "primary": "k1", "keys": {}}, '"version" is 2'),
    ({**_good(), "extra": 1}, "unknown field(s) extra"),
    ({"version": 1, "primary": "k1", "keys": {}}, "holds no key"),
    ({"version": 1, "primary": "k1", "keys": {"k1": base64.b64encode(b"short").decode()}},
     "not the base64 of 32 bytes"),
    ({"version": 1, "primary": "k1", "keys": {"k1": "%%%"}}, "not the base64 of 32 bytes"),
    ({**_good("k1"), "primary": "k9"}, '"primary" is "k9", which is not one of its keys'),
])
def test_bad_keyrings_name_the_file_and_the_problem(tmp_path: Path, doc: object,
                                                    words: str) -> None:
    path = tmp_path / "keyring.json"
    if isinstance(doc, str):
        _secret(path, doc.encode())
    else:
        _keyring(path, doc)
    with pytest.raises(KeyringError) as caught:
        load_keyring(path)
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_key_material_is_never_in_an_error(tmp_path: Path) -> None:
    doc = _good("k1")
    doc["primary"] = "nope"
    path = _keyring(tmp_path / "keyring.json", doc)
    with pytest.raises(KeyringError) as caught:
        load_keyring(path)
    assert doc["keys"]["k1"] not in str(caught.value)


def test_group_readable_keyring_is_refused_with_the_chmod(tmp_path: Path) -> None:
    path = _keyring(tmp_path / "keyring.json", _good(), mode=0o640)
    with pytest.raises(KeyringError, match=r"chmod 600"):
        load_keyring(path)


# --- configuration ----------------------------------------------------------------------


class Site:
    def __init__(self, root: Path) -> None:
        self.dir = root
        self.doc = full_doc()
        self.extra = ""

    @property
    def file(self) -> Path:
        return self.dir / "phiproxy.toml"

    def load(self):  # noqa: ANN201 - Config
        self.file.write_text(dump_toml(self.doc) + "\n" + self.extra)
        return load_config(self.file)

    def problems(self) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            self.load()
        for problem in caught.value.problems:
            assert problem.startswith(f"{self.file}: "), problem
        return caught.value.problems


@pytest.fixture
def site(tmp_path: Path) -> Site:
    write_dev_pki(tmp_path / "certs", ["billing"])
    _secret(tmp_path / "secrets" / "backend.pass", b"s3cret\n")
    _secret(tmp_path / "secrets" / "audit.key", os.urandom(32))
    create_keyring(tmp_path / "secrets" / "keyring.json")
    return Site(tmp_path)


ENCRYPTION = '[encryption]\nkeyring = "secrets/keyring.json"\n'


def test_protect_rules_and_keyring_load_in_file_order(site: Site) -> None:
    site.extra = ENCRYPTION + """plaintext_reads = "pass"

[[protect]]
keys = ["app:phi:public:*"]

[[protect]]
keys = ["app:phi:*", "app:notes:*"]
encrypt = true
max_ttl_s = 86400
default_ttl_s = 3600
"""
    config = site.load()
    assert config.encryption.keyring == site.dir / "secrets" / "keyring.json"
    assert config.encryption.plaintext_reads == "pass"
    assert config.encryption.cipher is not None
    assert "cipher" not in repr(config.encryption)  # key material stays out of logs
    first, second = config.protection.rules
    assert (first.index, first.keys, first.encrypt, first.max_ttl_s) == (
        0, ("app:phi:public:*",), False, None)
    assert (second.keys, second.encrypt, second.max_ttl_s, second.default_ttl_s) == (
        ("app:phi:*", "app:notes:*"), True, 86400, 3600)
    assert config.protection.rule_for(b"app:phi:public:x") is first  # first match wins
    assert config.protection.rule_for(b"app:notes:1") is second
    assert config.protection.rule_for(b"other") is None


def test_without_the_sections_nothing_is_protected(site: Site) -> None:
    config = site.load()
    assert not config.protection and config.encryption.cipher is None
    assert config.encryption.plaintext_reads == "refuse"


@pytest.mark.parametrize(("extra", "words"), [
    ('[[protect]]\nkeys = ["a:*"]\nmax_ttl_s = 60\ndefault_ttl_s = 61\n',
     "[[protect]] #1 default_ttl_s = 61: is longer than max_ttl_s = 60"),
    ('[[protect]]\nkeys = ["a:*"]\nencrypt = true\n',
     "[[protect]] #1 encrypt = true: needs a keyring, and [encryption] keyring is not set"),
    ('[[protect]]\nkeys = ["a:*"]\nencrpyt = true\n',
     "unknown key [[protect]] #1 encrpyt; did you mean 'encrypt'?"),
    ('[[protect]]\nkeys = []\n', "[[protect]] #1 keys = []: must list at least one"),
    ('[[protect]]\nencrypt = false\n', "[[protect]] #1 keys is missing"),
    ('[[protect]]\nkeys = ["a:*"]\nmax_ttl_s = 0\n', "[[protect]] #1 max_ttl_s = 0: must be"),
    ('[[protect]]\nkeys = ["a:*"]\ndefault_ttl_s = "60"\n',
     "[[protect]] #1 default_ttl_s = \"60\": must be an integer"),
    ('[protect]\nkeys = ["a:*"]\n', "[[protect]] must be an array of tables"),
    (ENCRYPTION + 'plaintext_reads = "allow"\n',
     '[encryption] plaintext_reads = "allow": must be "refuse" or "pass"'),
    ('[encryption]\nkeyring = "secrets/none.json"\n',
     "[encryption] keyring = \"secrets/none.json\": "),
    ('[encryption]\nkeyfile = "x"\n', "unknown key [encryption] keyfile"),
])
def test_mistakes_name_the_file_and_the_key(site: Site, extra: str, words: str) -> None:
    site.extra = extra
    problems = site.problems()
    assert any(words in p for p in problems), problems


def test_keyring_readable_by_others_is_refused(site: Site) -> None:
    (site.dir / "secrets" / "keyring.json").chmod(0o644)
    site.extra = ENCRYPTION
    [problem] = site.problems()
    assert "[encryption] keyring" in problem and "chmod 600" in problem


def test_a_broken_keyring_is_one_problem_not_two(site: Site) -> None:
    path = site.dir / "secrets" / "keyring.json"
    doc = json.loads(path.read_text())
    doc["primary"] = "gone"
    path.write_text(json.dumps(doc))
    site.extra = ENCRYPTION + '[[protect]]\nkeys = ["a:*"]\nencrypt = true\n'
    [problem] = site.problems()
    assert '[encryption] keyring = "secrets/keyring.json"' in problem
    assert '"primary" is "gone"' in problem


# --- the commands -----------------------------------------------------------------------


def test_keys_new_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "secrets" / "keyring.json"
    assert main(["keys", "new", "--out", str(out)]) == 0
    primary = load_keyring(out).primary
    assert primary in capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    before = out.read_bytes()
    assert main(["keys", "new", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "never overwritten" in err and "keys add" in err
    assert out.read_bytes() == before


def test_keys_add_command_and_check_config(site: Site, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    site.extra = ENCRYPTION + '[[protect]]\nkeys = ["app:phi:*"]\nencrypt = true\n'
    site.load()
    path = site.dir / "secrets" / "keyring.json"
    first = load_keyring(path).primary
    assert main(["keys", "add", "-c", str(site.file)]) == 0
    second = load_keyring(path).primary
    assert second != first and set(load_keyring(path).key_ids) == {first, second}
    out = capsys.readouterr().out
    assert second in out and first in out and "SIGHUP" in out and "keys rewrap" in out
    assert main(["check-config", "-c", str(site.file)]) == 0
    out = capsys.readouterr().out
    assert f"1 protect rules (1 encrypting), keyring {path}: primary {second}, 2 keys" in out
    key_material = json.loads(path.read_text())["keys"][second]
    assert key_material not in out


def test_keys_add_without_a_keyring_says_how(site: Site,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    site.load()
    assert main(["keys", "add", "-c", str(site.file)]) == 2
    err = capsys.readouterr().err
    assert str(site.file) in err and "[encryption] keyring is not set" in err


def test_check_config_refuses_default_beyond_max(site: Site,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    site.extra = '[[protect]]\nkeys = ["a:*"]\nmax_ttl_s = 10\ndefault_ttl_s = 20\n'
    site.file.write_text(dump_toml(site.doc) + "\n" + site.extra)
    assert main(["check-config", "-c", str(site.file)]) == 2
    assert "default_ttl_s = 20: is longer than max_ttl_s = 10" in capsys.readouterr().err


def test_the_example_configs_protect_block_loads(site: Site) -> None:
    """config/phiproxy.example.toml ships it commented out (it needs a keyring first)."""
    text = (Path(__file__).resolve().parents[2] / "config" / "phiproxy.example.toml"
            ).read_text()
    block = text.split("# --- protect example begin\n")[1].split("# --- protect example end")[0]
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in
             block.splitlines()]
    site.extra = "\n".join(lines).replace("../secrets/", "secrets/")
    config = site.load()
    public, phi = config.protection.rules
    assert not public.encrypt and phi.encrypt and (phi.max_ttl_s, phi.default_ttl_s) == (
        86400, 3600)
    assert config.encryption.plaintext_reads == "refuse" and config.encryption.cipher
