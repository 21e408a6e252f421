"""An encrypted repository's config is authenticated: a MAC keyed from the data key covers every field.

Whoever can write to the storage cannot change the encryption, chunk size, compression, KDF
parameters or id of a repository without the refusal naming the config (exit 3); the client's
memory (repo/known.py) catches what a MAC alone cannot (the MAC removed, a key record replaced, a
forged config with another id)."""

from __future__ import annotations

import base64
import json
import os

import pytest

from surepoint import storage
from surepoint.errors import DamagedData, WrongPassphrase
from surepoint.repo import crypto
from surepoint.repo.known import KnownRepositories
from surepoint.repo.repository import Repository
from tests.conftest import make_image

MiB = 1 << 20
PASSPHRASE = "correct horse"


def _create(path, known=None, cipher="aes-256-gcm") -> Repository:
    return Repository.create(
        storage.open(str(path), create=True), encryption=cipher, passphrase=PASSPHRASE, known=known
    )


def _open(path, known):
    return Repository.open(storage.open(str(path)), lambda: PASSPHRASE, known=known)


def _config(path) -> dict:
    return json.loads((path / "config").read_text())


def _write(path, config: dict) -> None:
    (path / "config").write_text(json.dumps(config, indent=2))


def _other_salt() -> str:
    return base64.b64encode(os.urandom(16)).decode()


# every field of the config, each edited to a value that passes the schema and bounds
EDITS = {
    "format": lambda c, o: c.update(format="surepoint-repositorY"),
    "version": lambda c, o: c.update(version=2),
    "id": lambda c, o: c.update(id="0" * 32),
    "created": lambda c, o: c.update(created="2020-01-01T00:00:00.000000Z"),
    "chunk_size": lambda c, o: c.update(chunk_size=c["chunk_size"] * 2),
    "digest": lambda c, o: c.update(digest="sha256"),
    "compression": lambda c, o: c.update(compression="lz4"),
    "compression_level": lambda c, o: c.update(compression_level=19),
    "encryption": lambda c, o: c.update(encryption=None),
    "encryption.cipher": lambda c, o: c["encryption"].update(cipher="chacha20-poly1305"),
    "encryption.kdf.n": lambda c, o: c["encryption"]["kdf"].update(n=2**14),
    "encryption.kdf.r": lambda c, o: c["encryption"]["kdf"].update(r=4),
    "encryption.kdf.p": lambda c, o: c["encryption"]["kdf"].update(p=2),
    "encryption.kdf.salt": lambda c, o: c["encryption"]["kdf"].update(salt=_other_salt()),
    "encryption.wrapped_key": lambda c, o: c["encryption"].update(wrapped_key=o["encryption"]["wrapped_key"]),
    "encryption (whole record of another repository)": lambda c, o: c.update(encryption=o["encryption"]),
    "a field added": lambda c, o: c.update(immutable=False),
    "mac removed": lambda c, o: c.pop("mac"),
    "mac of another repository": lambda c, o: c.update(mac=o["mac"]),
    "forged config with another id": lambda c, o: (c.clear(), c.update(o)),
}


@pytest.fixture(scope="module")
def repositories(tmp_path_factory):
    base = tmp_path_factory.mktemp("mac")
    known = KnownRepositories(str(base / "known.json"))
    _create(base / "repo", known)
    _create(base / "other", known)  # same passphrase: its key record and MAC open with it too
    return base, known


@pytest.mark.parametrize("field", list(EDITS))
def test_every_field_edited_is_refused_as_damage_naming_the_config(repositories, field):
    base, known = repositories
    good = (base / "repo" / "config").read_text()
    config = json.loads(good)
    EDITS[field](config, _config(base / "other"))
    _write(base / "repo", config)
    try:
        with pytest.raises(DamagedData, match="repository config") as raised:
            _open(base / "repo", known)
        assert raised.value.exit_code == 3
    finally:
        (base / "repo" / "config").write_text(good)
    assert _open(base / "repo", known).id == config.get("id") or field.startswith(("id", "forged"))


@pytest.mark.parametrize(
    "field", ["version", "created", "chunk_size", "compression_level", "a field added", "mac of another repository"]
)
def test_the_mac_alone_catches_edits_on_a_machine_that_never_saw_the_repository(repositories, tmp_path, field):
    base, _known = repositories
    good = (base / "repo" / "config").read_text()
    config = json.loads(good)
    EDITS[field](config, _config(base / "other"))
    _write(base / "repo", config)
    try:
        with pytest.raises(crypto.ConfigNotAuthentic, match="fails authentication"):
            _open(base / "repo", KnownRepositories(str(tmp_path / "fresh.json")))
        with pytest.raises(crypto.ConfigNotAuthentic):
            _open(base / "repo", None)
    finally:
        (base / "repo" / "config").write_text(good)


def test_a_wrong_passphrase_is_still_a_wrong_passphrase(repositories):
    base, known = repositories
    with pytest.raises(WrongPassphrase):
        Repository.open(storage.open(str(base / "repo")), lambda: "wrong", known=known)


def test_a_repository_without_a_mac_gets_one_and_then_needs_it(tmp_path):
    """A config written before MACs existed: the next open with the key adds one; from then on this
    machine refuses the config without it, and every client checks it."""
    known = KnownRepositories(str(tmp_path / "known.json"))
    _create(tmp_path / "repo")
    old = _config(tmp_path / "repo")
    del old["mac"]
    _write(tmp_path / "repo", old)
    repository = _open(tmp_path / "repo", known)
    added = _config(tmp_path / "repo")
    assert crypto.config_mac_matches(repository.keys, added)
    assert {k: v for k, v in added.items() if k != "mac"} == old
    assert os.stat(tmp_path / "repo" / "config").st_mode & 0o777 == 0o600
    _write(tmp_path / "repo", old)  # stripped again
    with pytest.raises(DamagedData, match="lost its MAC"):
        _open(tmp_path / "repo", known)
    _write(tmp_path / "repo", {**added, "chunk_size": 4 * MiB})
    with pytest.raises(crypto.ConfigNotAuthentic):
        _open(tmp_path / "repo", KnownRepositories(str(tmp_path / "elsewhere.json")))


def test_passwd_keeps_the_config_authentic_and_remembered(tmp_path):
    known = KnownRepositories(str(tmp_path / "known.json"))
    repository = _create(tmp_path / "repo", known)
    repository.change_passphrase(PASSPHRASE, "new passphrase")
    reopened = Repository.open(storage.open(str(tmp_path / "repo")), lambda: "new passphrase", known=known)
    assert crypto.config_mac_matches(reopened.keys, _config(tmp_path / "repo"))
    with pytest.raises(WrongPassphrase):  # the old one is simply wrong now, not "tampering"
        _open(tmp_path / "repo", known)


def test_an_edited_config_writes_nothing(cli, tmp_path):
    """Through the command line: exit 3 naming the config, and not one object written."""
    cli.run("init", "--encryption", "chacha20-poly1305", check=True)
    image = make_image(tmp_path / "disk.img", 2 * MiB)
    cli.run("backup", str(image), "--name", "disk", check=True)
    good = (cli.repo / "config").read_text()
    before = sorted(str(p.relative_to(cli.repo)) for p in cli.repo.rglob("*") if p.is_file())
    for change in (
        lambda c: c.update(compression_level=9),
        lambda c: c.pop("mac"),
        lambda c: c["encryption"]["kdf"].update(salt=_other_salt()),
    ):
        config = json.loads(good)
        change(config)
        _write(cli.repo, config)
        refused = cli.run("backup", str(image), "--name", "disk")
        assert refused.returncode == 3 and "repository config" in refused.stderr, refused.stderr
        after = sorted(str(p.relative_to(cli.repo)) for p in cli.repo.rglob("*") if p.is_file())
        assert after == before
    (cli.repo / "config").write_text(good)
    assert cli.run("backup", str(image), "--name", "disk").returncode == 0


def test_a_malformed_key_record_is_damage_for_a_known_repository(repositories):
    """(Found by tests/fuzz: the client's memory was consulted before the schema check.)"""
    base, known = repositories
    good = (base / "repo" / "config").read_text()
    for change in (lambda c: c["encryption"].pop("cipher"), lambda c: c["encryption"].update(cipher=[1])):
        config = json.loads(good)
        change(config)
        _write(base / "repo", config)
        try:
            with pytest.raises(DamagedData, match="repository config is damaged"):
                _open(base / "repo", known)
        finally:
            (base / "repo" / "config").write_text(good)
