"""Guest paths: the guest's /etc/fstab mapped onto partitions, a second disk and LVM volumes, so that
`restore-files NAME:latest /data/app.conf` and DIR/guest of `mount` work as the guest sees its tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mount import guest_disks
from tests.mount.conftest import needs_root_and_tools

pytestmark = needs_root_and_tools(*guest_disks.TOOLS)

# -- a mounted restore point of a guest with two disks and LVM ------------------------------------------

ROOT = {"etc/hostname": b"web01\n", "etc/app/main.conf": b"root side\n"}
DATA = {"app.conf": b"port = 8080\n", "db/big.bin": os.urandom(300_000)}
SRV = {"site/index.html": b"<h1>hello</h1>\n"}


@pytest.fixture
def guest_point(mcli, tmp_path: Path) -> str:
    disks = guest_disks.build(tmp_path / "guest", root_files=ROOT, data_files=DATA, srv_files=SRV)
    mcli.run("init", check=True)
    mcli.run("backup", str(disks.disk0), str(disks.disk1), "--name", "web01", check=True)
    return "web01:latest"


def test_restore_files_with_guest_paths_and_mount_guest_view(mcli, tmp_path: Path, guest_point: str) -> None:
    out = tmp_path / "out"
    result = mcli.run(
        "restore-files", guest_point, "/data/app.conf", "/srv/site", "/etc/hostname", "/home/user", "--to", str(out)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "data" / "app.conf").read_bytes() == DATA["app.conf"]
    assert (out / "srv" / "site" / "index.html").read_bytes() == SRV["site/index.html"]
    assert (out / "etc" / "hostname").read_bytes() == b"web01\n"
    assert (out / "home" / "user" / "notes.txt").read_bytes() == b"notes\n"
    assert "/data on disk 1 fs" in result.stdout

    gone = mcli.run("restore-files", guest_point, "/gone/x", "--to", str(tmp_path / "out2"))
    assert gone.returncode == 2, gone.stdout + gone.stderr
    assert "/gone" in gone.stderr and "UUID=0badc0de" in gone.stderr and "--disk" in gone.stderr

    # the old form still works: a path inside the filesystem of a named disk
    old = mcli.run("restore-files", guest_point, "/app.conf", "--disk", "1", "--to", str(tmp_path / "out3"))
    assert old.returncode == 0, old.stderr
    assert (tmp_path / "out3" / "app.conf").read_bytes() == DATA["app.conf"]

    where = tmp_path / "mnt"
    where.mkdir()
    shown = mcli.run("mount", guest_point, str(where), check=True)
    assert f"the guest's tree at {where}/guest: / = disk0/part1, /data = disk1/fs" in shown.stdout
    assert "/gone (UUID=0badc0de-0000-4000-8000-000000000000) not shown: no filesystem with UUID" in shown.stderr
    [state] = mcli.run("mounts", "--json", check=True).json()
    try:
        layout = {m["mountpoint"]: (m["disk"], m["volume"]) for m in state["guest"]["layout"]["mounts"]}
        assert layout == {
            "/": (0, "part1"),
            "/data": (1, "fs"),
            "/srv": (0, "lvm-vg-guest-srv"),
            "/home": (0, "lvm-vg-guest-home"),
        }
        assert [u["mountpoint"] for u in state["guest"]["layout"]["unresolved"]] == ["/gone"]
        # srv is in two pieces of the physical volume: served put together as one image
        assert (where / "disks" / "0-lvm-vg-guest-srv.raw").stat().st_size == 32 << 20
        guest = where / "guest"
        assert (guest / "data" / "app.conf").read_bytes() == DATA["app.conf"]
        assert (guest / "data" / "db" / "big.bin").read_bytes() == DATA["db/big.bin"]
        assert (guest / "srv" / "site" / "index.html").read_bytes() == SRV["site/index.html"]
        assert (guest / "etc" / "app" / "main.conf").read_bytes() == ROOT["etc/app/main.conf"]
        with pytest.raises(OSError):
            (guest / "data" / "new").write_text("x")  # read-only, like every filesystem of a mount
        # a restore-files beside the mount reuses it
        again = mcli.run("restore-files", guest_point, "/srv/site/index.html", "--to", str(tmp_path / "out4"))
        assert again.returncode == 0, again.stderr
    finally:
        mcli.run("umount", str(where), check=True)
    assert not os.path.ismount(where / "guest")
