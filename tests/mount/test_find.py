"""The file index and `surepoint find`: a file created, changed and deleted across restore points of a
guest (two disks, partitions, LVM), found by guest path without mounting; unchanged filesystems are
not walked again."""

from __future__ import annotations

from pathlib import Path

from tests.mount import guest_disks
from tests.mount.conftest import needs_root_and_tools

pytestmark = needs_root_and_tools(*guest_disks.TOOLS)


def _backup_and_index(cli, disks: guest_disks.GuestDisks) -> tuple[str, dict]:
    point = cli.run("backup", str(disks.disk0), str(disks.disk1), "--name", "web01", "--json", check=True).json()
    point_id = point.get("restore_point") or point["id"]
    indexed = cli.run("index", point_id, "--json", check=True).json()["indexed"]
    assert [i["restore_point"] for i in indexed] == [point_id]
    return point_id, indexed[0]


def _history(cli, pattern: str, *extra: str) -> dict[str, list[tuple[str, str]]]:
    result = cli.run("find", pattern, "--json", *extra)
    assert result.returncode in (0, 1), result.stderr
    return {p["path"]: [(v["restore_point"], v["change"]) for v in p["versions"]] for p in result.json()["paths"]}


def test_find_reports_created_changed_deleted(mcli, tmp_path: Path) -> None:
    disks = guest_disks.build(
        tmp_path / "guest",
        root_files={"etc/hostname": b"web01\n"},
        data_files={"app.conf": b"port = 8080\n"},
        srv_files={"site/index.html": b"<h1>hello</h1>\n"},
    )
    mcli.run("init", check=True)
    assert mcli.run("find", "app.conf").returncode == 1  # nothing indexed yet

    p1, first = _backup_and_index(mcli, disks)
    assert first["mounted"] and not any(v["reused"] for v in first["volumes"])
    mountpoints = {v["mountpoint"] for v in first["volumes"]}
    assert mountpoints == {"/", "/data", "/srv", "/home"}

    guest_disks.rewrite_fs(disks, "data", {"app.conf": b"port = 9090\n", "new.txt": b"new\n"}, tmp_path)
    p2, second = _backup_and_index(mcli, disks)
    reused = {v["mountpoint"]: v["reused"] for v in second["volumes"]}
    assert reused == {"/": True, "/data": False, "/srv": True, "/home": True}  # only /data was walked

    guest_disks.rewrite_fs(disks, "data", {"new.txt": None}, tmp_path)
    p3, _ = _backup_and_index(mcli, disks)
    p4, fourth = _backup_and_index(mcli, disks)  # nothing changed: not even mounted
    assert not fourth["mounted"] and all(v["reused"] for v in fourth["volumes"])

    assert _history(mcli, "app.conf") == {
        "/data/app.conf": [(p1, "present"), (p2, "changed"), (p3, "unchanged"), (p4, "unchanged")]
    }
    assert _history(mcli, "/data/new.txt") == {"/data/new.txt": [(p2, "created"), (p3, "deleted")]}
    assert _history(mcli, "/srv/site/*.html") == {
        "/srv/site/index.html": [(p1, "present"), (p2, "unchanged"), (p3, "unchanged"), (p4, "unchanged")]
    }
    assert list(_history(mcli, "/etc/host*")) == ["/etc/hostname"]
    assert _history(mcli, "app.conf", "--name", "db01") == {}

    text = mcli.run("find", "new.txt", check=True).stdout
    assert "web01: /data/new.txt" in text and f"{p2}  created" in text and f"{p3}  deleted" in text

    mcli.run("forget", "--keep-last", "3", "--name", "web01", check=True)
    assert _history(mcli, "app.conf")["/data/app.conf"][0] == (p2, "present")
