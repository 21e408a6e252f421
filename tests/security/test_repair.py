"""`verify --repair`: damaged chunks quarantined, fetched back from a copy or stored again by the
next backup; points marked damaged, then healed; what no copy holds is reported lost (exit 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faultlib import CHUNK, MiB, Repo, make_random_image, sha256_file

pytestmark = pytest.mark.timeout(300)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def pair(tmp_path: Path):
    """A repository with two points of `disk` and a copy of it under other keys (other chunk ids)."""
    main = Repo(tmp_path / "main", encryption="aes-256-gcm", passphrase="main secret")
    main.init()
    image = tmp_path / "disk.img"
    first = make_random_image(image, MiB, seed=1)
    p1 = main.backup(image, name="disk")["id"]
    with open(image, "r+b") as f:  # the second point shares all but its first chunk
        f.write(b"\1" * CHUNK)
    second = sha256_file(image)
    p2 = main.backup(image, name="disk")["id"]
    copy = Repo(tmp_path / "copy", encryption="chacha20-poly1305", passphrase="copy secret")
    copy.init()
    copy.ok("copy", "--from", str(main.path), env=copy.env(SUREPOINT_FROM_PASSPHRASE=main.passphrase))
    return main, copy, image, {p1: first, p2: second}


def _repair(main: Repo, copy: Repo | None = None):
    args = ["verify", "--repair", "--json"]
    env = main.env()
    if copy is not None:
        args += ["--from", str(copy.path)]
        env = main.env(SUREPOINT_FROM_PASSPHRASE=copy.passphrase)
    result = main.run(*args, env=env)
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def _states(main: Repo) -> dict[str, str]:
    return {p["id"]: p["state"] for p in main.points()}


def test_damaged_and_missing_chunks_are_healed_from_a_copy(pair):
    main, copy, _image, shas = pair
    p1, p2 = shas
    names = [n for n in main.chunk_names(p1) if n]
    _flip(main.path / names[3])
    _flip(main.path / names[5])
    (main.path / names[7]).unlink()
    assert main.run("verify").returncode == 3
    assert set(_states(main).values()) == {"damaged"}  # list says so
    code, report = _repair(main, copy)
    assert code == 0, report
    assert report["healed_chunks"] == 3 and report["lost_chunks"] == 0
    assert {p["id"]: p["state"] for p in report["points"]} == {p1: "healed", p2: "healed"}
    assert set(_states(main).values()) == {"healed"}
    for point, sha in shas.items():
        main.restore_matches(point, sha)
    main.verify_clean()
    assert not list((main.path / "quarantine").glob("*"))  # the bad copies are gone once healed


def test_the_next_backup_stores_a_quarantined_chunk_again(pair):
    main, _copy, image, shas = pair
    p1, p2 = shas
    victim = main.chunk_names(p2)[4]  # shared by both points, still in the source image
    _flip(main.path / victim)
    code, report = _repair(main)
    assert code == 3 and report["quarantined_chunks"] == 1, report
    assert {p["state"] for p in report["points"]} == {"damaged"}
    (ranges,) = {json.dumps(p["damaged"]) for p in report["points"]}
    assert json.loads(ranges)[0]["offset"] == 4 * CHUNK and "next backup" in json.loads(ranges)[0]["reason"]
    assert (main.path / "quarantine" / Path(victim).name).exists()
    assert not (main.path / victim).exists()
    # dedupe does not trust it: the next backup of the same source stores it again
    p3 = main.backup(image, name="disk")
    assert p3["id"] not in shas
    assert (main.path / victim).exists()
    code, report = _repair(main)
    assert code == 0, report
    states = {p["id"]: p["state"] for p in report["points"]}
    assert states[p1] == states[p2] == "healed" and states[p3["id"]] == "verified"
    for point, sha in shas.items():
        main.restore_matches(point, sha)
    assert not (main.path / "quarantine" / Path(victim).name).exists()


def test_a_chunk_missing_from_both_is_reported_lost(pair):
    main, copy, _image, shas = pair
    p1, p2 = shas
    main_names, copy_names = main.chunk_names(p1), copy.chunk_names(p1)
    (main.path / main_names[6]).unlink()
    (copy.path / copy_names[6]).unlink()
    _flip(main.path / main_names[2])  # this one the copy still has
    code, report = _repair(main, copy)
    assert code == 3, report
    assert report["healed_chunks"] == 1 and report["lost_chunks"] == 1
    for point in report["points"]:
        assert point["state"] == "damaged"
        assert [(r["disk"], r["offset"], r["length"]) for r in point["lost"]] == [(0, 6 * CHUNK, CHUNK)]
        assert str(copy.path) in point["lost"][0]["reason"]
    env = main.env(SUREPOINT_FROM_PASSPHRASE=copy.passphrase)
    text = main.run("verify", "--repair", "--from", str(copy.path), env=env)
    assert text.returncode == 3 and f"lost: disk 0 bytes {6 * CHUNK}-{7 * CHUNK - 1}" in text.stdout
    assert set(_states(main).values()) == {"damaged"}
