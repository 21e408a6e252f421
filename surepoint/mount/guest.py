"""Guest paths as the guest sees them: its /etc/fstab mapped onto the filesystems of a mount.

A mount of a restore point serves every filesystem it finds under DIR/disk<n>/<volume>
(partitions, whole-disk filesystems, LVM logical volumes). The guest sees them at the mount points
of its /etc/fstab. `guest_layout` reads the fstab of the root filesystem (the one holding
/etc/fstab, preferably one whose fstab names itself for /) and resolves every entry to one of the
mounted filesystems:

* `UUID=`, `LABEL=` (and /dev/disk/by-uuid/, by-label/): the filesystem's UUID or label (blkid);
* `PARTUUID=`, `PARTLABEL=` (and by-partuuid/, by-partlabel/): the partition's GPT unique GUID
  or name, or an MBR disk signature with the partition number (`1234abcd-02`);
* `/dev/vdX[N]`, `/dev/sdX[N]`, `/dev/xvdX[N]`, `/dev/hdX[N]`, `/dev/nvmeMnNpP`: disk by its name in
  the restore point (a libvirt target such as `vdb`) or else by its order (the n-th disk is the
  n-th letter: disks are numbered in the order the VM's block devices were listed), then the
  partition number; no number: a whole-disk filesystem;
* `/dev/mapper/VG-LV` (a `-` inside a name doubled) and `/dev/VG/LV`: an LVM logical volume.

Entries that are not local filesystems (swap, tmpfs, proc, network filesystems, bind mounts,
`none`) are left out; an entry that names nothing found is listed in `unresolved` with the
reason. The fstab text comes from the guest: it is size-limited, parsed as data, and every name
from it is printed through surepoint.text.printable by the callers.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field

FSTAB_LIMIT = 1 << 20
NOT_LOCAL = frozenset(
    [
        "swap",
        "none",
        "tmpfs",
        "devtmpfs",
        "proc",
        "sysfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "securityfs",
        "debugfs",
        "tracefs",
        "mqueue",
        "hugetlbfs",
        "pstore",
        "bpf",
        "configfs",
        "fusectl",
        "efivarfs",
        "binfmt_misc",
        "autofs",
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "sshfs",
        "fuse",
        "fuse.sshfs",
        "9p",
        "virtiofs",
        "ceph",
        "glusterfs",
        "iso9660",
        "udf",
        "auto",
    ]
)
_DISK_DEVICE = re.compile(r"/dev/(vd|sd|xvd|hd)([a-z]+)([0-9]*)")
_NVME_DEVICE = re.compile(r"/dev/nvme([0-9]+)n([0-9]+)(?:p([0-9]+))?")


@dataclass
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: str


@dataclass
class GuestMount:
    """A guest mount point and the filesystem of the mount that the guest sees there."""

    mountpoint: str  # as in the guest: "/", "/data"
    source: dict  # the mount's entry (path, disk, volume, fstype, uuid, label...)
    spec: str  # as written in fstab

    def to_json(self) -> dict:
        return {
            "mountpoint": self.mountpoint,
            "spec": self.spec,
            "disk": self.source.get("disk"),
            "volume": self.source.get("volume"),
            "path": self.source.get("path"),
        }


@dataclass
class GuestLayout:
    root: GuestMount | None = None
    mounts: list[GuestMount] = field(default_factory=list)  # "/" first, then by depth
    unresolved: list[dict] = field(default_factory=list)  # {"spec", "mountpoint", "reason"}
    note: str = ""  # why there is no layout (no root filesystem found...)

    def locate(self, guest_path: str) -> tuple[GuestMount, str] | None:
        """The filesystem a guest path lies on and the path inside it (longest mount point first)."""
        path = posixpath.normpath("/" + guest_path.lstrip("/"))
        for mount in sorted(self.mounts, key=lambda m: -len(m.mountpoint)):
            mp = mount.mountpoint
            if path == mp or mp == "/" or path.startswith(mp + "/"):
                inner = "/" + path[len(mp) :].lstrip("/") if mp != "/" else path
                return mount, inner
        return None

    def to_json(self) -> dict:
        return {
            "mounts": [m.to_json() for m in self.mounts],
            "unresolved": self.unresolved,
            "note": self.note,
        }


def parse_fstab(text: str) -> list[FstabEntry]:
    """The local filesystem entries of an fstab (octal escapes such as \\040 decoded)."""
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        spec, mountpoint = _unoctal(fields[0]), _unoctal(fields[1])
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = fields[3] if len(fields) > 3 else "defaults"
        if fstype in NOT_LOCAL or fstype.startswith("fuse."):
            continue
        if "bind" in options.split(",") or not mountpoint.startswith("/"):
            continue
        if ":" in spec and not spec.startswith("/"):  # host:/export
            continue
        entries.append(FstabEntry(spec, posixpath.normpath(mountpoint), fstype, options))
    return entries


def _unoctal(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def read_fstab(root_path: str) -> str | None:
    """The text of etc/fstab under a mounted filesystem (never following a symlink out of it), or None."""
    etc = os.path.join(root_path, "etc")
    try:
        if os.path.islink(etc):
            return None
        fd = os.open(os.path.join(etc, "fstab"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(FSTAB_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return None


def resolve_spec(spec: str, mounts: list[dict], disk_names: dict[int, str]) -> dict | str:
    """The mount entry an fstab source names, or the reason none does."""
    key, _, value = spec.partition("=")
    by_link = {
        "/dev/disk/by-uuid/": "UUID",
        "/dev/disk/by-label/": "LABEL",
        "/dev/disk/by-partuuid/": "PARTUUID",
        "/dev/disk/by-partlabel/": "PARTLABEL",
    }
    for prefix, tag in by_link.items():
        if spec.startswith(prefix):
            key, value = tag, spec[len(prefix) :].replace("\\x2d", "-").replace("\\x20", " ")
    field_of = {"UUID": "uuid", "LABEL": "label", "PARTUUID": "partuuid", "PARTLABEL": "partlabel"}
    if key.upper() in field_of and value:
        name = field_of[key.upper()]
        value = value.strip('"')
        fold = name in ("uuid", "partuuid")
        found = [m for m in mounts if _same(m.get(name), value, fold)]
        if len(found) == 1:
            return found[0]
        return f"no filesystem with {key.upper()}={value}" if not found else f"several filesystems with {key}={value}"
    if spec.startswith("/dev/mapper/") or re.fullmatch(r"/dev/[^/]+/[^/]+", spec) and not spec.startswith("/dev/disk/"):
        lv = _lv_name(spec)
        if lv is not None:
            found = [m for m in mounts if m.get("lv") == lv]
            if found:
                return found[0]
            if spec.startswith("/dev/mapper/"):
                return f"no LVM logical volume {lv} was mounted"
    match = _DISK_DEVICE.fullmatch(spec)
    nvme = _NVME_DEVICE.fullmatch(spec)
    if match or nvme:
        if match:
            letters, partition = match.group(2), match.group(3)
            index = _letters_index(letters)
            wanted_name = match.group(1) + letters
        else:
            index = int(nvme.group(2)) - 1  # namespace numbers of one controller, in disk order
            partition = nvme.group(3) or ""
            wanted_name = f"nvme{nvme.group(1)}n{nvme.group(2)}"
        by_name = [n for n, disk_name in disk_names.items() if disk_name == wanted_name]
        disk = by_name[0] if by_name else (sorted(disk_names)[index] if index < len(disk_names) else None)
        if disk is None:
            return f"the restore point has no disk {wanted_name}"
        volume = f"part{partition}" if partition else "fs"
        found = [m for m in mounts if m.get("disk") == disk and m.get("volume") == volume]
        if found:
            return found[0]
        return f"disk {disk} ({wanted_name}) has no mounted {volume}"
    return "a source this reader does not map (use the disk and partition form)"


def _same(have: object, want: str, fold: bool) -> bool:
    if not isinstance(have, str) or not have:
        return False
    return have.lower() == want.lower() if fold else have == want


def _letters_index(letters: str) -> int:
    index = 0
    for c in letters:
        index = index * 26 + (ord(c) - ord("a") + 1)
    return index - 1


def _lv_name(spec: str) -> str | None:
    """`vg/lv` from /dev/mapper/vg-lv (a `-` in a name is written `--`) or /dev/vg/lv."""
    if spec.startswith("/dev/mapper/"):
        name = spec[len("/dev/mapper/") :]
        parts = re.split(r"(?<!-)-(?!-)", name)
        if len(parts) != 2:
            return None
        return f"{parts[0].replace('--', '-')}/{parts[1].replace('--', '-')}"
    parts = spec.split("/")
    if len(parts) == 4 and parts[2] not in ("disk", "mapper", "block", "md", "loop"):
        return f"{parts[2]}/{parts[3]}"
    return None


def guest_layout(mounts: list[dict], disk_names: dict[int, str]) -> GuestLayout:
    """Find the root filesystem among `mounts` (each with "path") and map its fstab onto them."""
    candidates = []
    for mount in mounts:
        text = read_fstab(mount["path"])
        if text is not None:
            candidates.append((mount, parse_fstab(text)))
    if not candidates:
        return GuestLayout(note="no filesystem of the restore point holds /etc/fstab")
    chosen = None
    for mount, entries in candidates:  # the one whose own fstab names it as /
        root_entry = next((e for e in entries if e.mountpoint == "/"), None)
        if root_entry is not None and resolve_spec(root_entry.spec, mounts, disk_names) is mount:
            chosen = (mount, entries)
            break
    if chosen is None:
        if len(candidates) > 1:
            where = ", ".join(f"disk {m['disk']} {m['volume']}" for m, _ in candidates)
            return GuestLayout(note=f"several filesystems hold /etc/fstab ({where}) and none names itself as /")
        chosen = candidates[0]
    root_mount, entries = chosen
    layout = GuestLayout()
    root_spec = next((e.spec for e in entries if e.mountpoint == "/"), "(the filesystem holding /etc/fstab)")
    layout.root = GuestMount("/", root_mount, root_spec)
    layout.mounts.append(layout.root)
    seen = {"/"}
    for entry in entries:
        if entry.mountpoint in seen:
            continue
        found = resolve_spec(entry.spec, mounts, disk_names)
        if isinstance(found, str):
            layout.unresolved.append({"spec": entry.spec, "mountpoint": entry.mountpoint, "reason": found})
            continue
        seen.add(entry.mountpoint)
        layout.mounts.append(GuestMount(entry.mountpoint, found, entry.spec))
    layout.mounts.sort(key=lambda m: (m.mountpoint != "/", m.mountpoint.count("/"), m.mountpoint))
    return layout
