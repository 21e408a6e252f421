"""surepoint.mount.guest: fstab parsing, fstab sources resolved to mounted filesystems, the root found."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.mount.guest import GuestLayout, GuestMount, guest_layout, parse_fstab, resolve_spec

# -- pure: fstab parsing and source resolution --------------------------------------------------------

MOUNTS = [
    {"disk": 0, "volume": "part1", "uuid": "1111-aaaa", "label": "", "partuuid": "abcd-01", "partlabel": "root"},
    {"disk": 0, "volume": "lvm-vg--x-srv", "uuid": "2222", "label": "srv", "lv": "vg-x/srv"},
    {"disk": 1, "volume": "fs", "uuid": "3333", "label": "appdata"},
    {"disk": 2, "volume": "part3", "uuid": "4444", "label": ""},
]
NAMES = {0: "disk0.img", 1: "disk1.img", 2: "disk2.img"}


def test_fstab_keeps_local_filesystems_only() -> None:
    text = (
        "# comment\n\n"
        "UUID=1111-AAAA / ext4 errors=remount-ro 0 1\n"
        "LABEL=my\\040data /mnt/my\\040data ext4 defaults 0 2\n"
        "tmpfs /tmp tmpfs defaults 0 0\n"
        "server:/export /nfs nfs defaults 0 0\n"
        "/dev/sdb2 none swap sw 0 0\n"
        "/srv/a /srv/b none bind 0 0\n"
        "proc /proc proc defaults 0 0\n"
        "/dev/vdb1 /boot/ ext4\n"
    )
    entries = parse_fstab(text)
    assert [(e.spec, e.mountpoint) for e in entries] == [
        ("UUID=1111-AAAA", "/"),
        ("LABEL=my data", "/mnt/my data"),
        ("/dev/vdb1", "/boot"),
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("UUID=1111-AAAA", ("part1", 0)),  # UUIDs compare without case
        ("/dev/disk/by-uuid/3333", ("fs", 1)),
        ("LABEL=appdata", ("fs", 1)),
        ("/dev/disk/by-label/srv", ("lvm-vg--x-srv", 0)),
        ("PARTUUID=ABCD-01", ("part1", 0)),
        ("PARTLABEL=root", ("part1", 0)),
        ("/dev/mapper/vg--x-srv", ("lvm-vg--x-srv", 0)),
        ("/dev/vg-x/srv", ("lvm-vg--x-srv", 0)),
        ("/dev/vdb", ("fs", 1)),  # the second disk, by order
        ("/dev/sdc3", ("part3", 2)),
        ("/dev/nvme0n2", ("fs", 1)),
    ],
)
def test_sources_resolve_to_mounted_filesystems(spec: str, expected: tuple[str, int]) -> None:
    found = resolve_spec(spec, MOUNTS, NAMES)
    assert isinstance(found, dict), found
    assert (found["volume"], found["disk"]) == expected


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("UUID=ffff", "no filesystem with UUID=ffff"),
        ("/dev/mapper/vg-gone", "no LVM logical volume vg/gone"),
        ("/dev/vdz1", "no disk vdz"),
        ("/dev/vda2", "disk 0 (vda) has no mounted part2"),
        ("/dev/dm-3", "does not map"),
    ],
)
def test_unknown_sources_say_why(spec: str, reason: str) -> None:
    found = resolve_spec(spec, MOUNTS, NAMES)
    assert isinstance(found, str) and reason in found


def test_libvirt_disk_names_win_over_order() -> None:
    names = {0: "vda", 1: "vdc", 2: "vdb"}
    assert resolve_spec("/dev/vdb3", MOUNTS, names)["disk"] == 2  # type: ignore[index]


def test_locate_takes_the_longest_mount_point() -> None:
    root, data, deep = ({"disk": i} for i in range(3))
    layout = GuestLayout(
        mounts=[GuestMount("/", root, "x"), GuestMount("/data", data, "y"), GuestMount("/data/deep", deep, "z")]
    )
    assert layout.locate("/etc/passwd") == (layout.mounts[0], "/etc/passwd")
    assert layout.locate("/data/app.conf") == (layout.mounts[1], "/app.conf")
    assert layout.locate("/data") == (layout.mounts[1], "/")
    assert layout.locate("/data/deep/x") == (layout.mounts[2], "/x")
    assert layout.locate("/database") == (layout.mounts[0], "/database")


def test_root_is_the_filesystem_whose_fstab_names_itself(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for fs, text in ((a, "LABEL=other / ext4\n"), (b, "UUID=bbbb / ext4\nUUID=aaaa /data ext4\n")):
        (fs / "etc").mkdir(parents=True)
        (fs / "etc" / "fstab").write_text(text)
    mounts = [
        {"disk": 0, "volume": "fs", "uuid": "aaaa", "path": str(a)},
        {"disk": 1, "volume": "fs", "uuid": "bbbb", "path": str(b)},
    ]
    layout = guest_layout(mounts, {0: "a", 1: "b"})
    assert [(m.mountpoint, m.source["disk"]) for m in layout.mounts] == [("/", 1), ("/data", 0)]
    (b / "etc" / "fstab").unlink()
    (b / "etc" / "fstab").symlink_to("/etc/fstab")  # a link out of the guest is never read
    assert guest_layout(mounts, {}).mounts[0].source["disk"] == 0
