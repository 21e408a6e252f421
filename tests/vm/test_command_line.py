"""surepoint.vm.command_line: saved QEMU command lines as users write them, rewritten (pure, no QEMU)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from surepoint.errors import InvalidArgument
from surepoint.vm.command_line import DiskMap, NetworkMap, disk_maps, rewrite

QEMU = "qemu-system-x86_64"
W = "/srv/restored/web01"
NEW_MAC = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def hand_run() -> list[str]:
    """A VM as people start it by hand: daemonized, pidfile, -drive, tap, qga, monitor, VNC."""
    return [
        QEMU, "-enable-kvm", "-name", "web01", "-m", "2048", "-smp", "2",
        "-drive", "file=/var/lib/vms/web01.qcow2,format=qcow2,if=virtio,cache=none,l2-cache-size=4M",
        "-drive", "file=/var/lib/vms/web01-data.img,format=raw,if=virtio",
        "-cdrom", "/iso/debian.iso",
        "-netdev", "tap,id=net0,ifname=tap-web01,script=no,downscript=no,vhost=on",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:00:01",
        "-chardev", "socket,path=/run/vms/web01-qga.sock,server=on,wait=off,id=qga0",
        "-device", "virtio-serial",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-qmp", "unix:/run/vms/web01.qmp,server,nowait",
        "-monitor", "telnet:127.0.0.1:4444,server,nowait",
        "-serial", "file:/var/log/vms/web01.log",
        "-vnc", ":5,password=on",
        "-pidfile", "/run/vms/web01.pid",
        "-daemonize",
    ]  # fmt: skip


def test_hand_run_vm_rewritten_for_a_restore() -> None:
    disks = [
        DiskMap("/var/lib/vms/web01.qcow2", f"{W}/disk0.raw", "raw"),
        DiskMap("/var/lib/vms/web01-data.img", f"{W}/disk1.qcow2", "qcow2"),
    ]
    r = rewrite(hand_run(), name="web01-restored", workdir=W, disks=disks)
    argv = r.argv
    assert "-daemonize" not in argv and r.daemonize
    assert values(argv, "-name") == ["web01-restored"]
    # the qcow2-only option goes with the format change; the rest of the drive stays
    assert values(argv, "-drive") == [
        f"file={W}/disk0.raw,format=raw,if=virtio,cache=none",
        f"file={W}/disk1.qcow2,format=qcow2,if=virtio",
    ]
    assert values(argv, "-cdrom") == ["/iso/debian.iso"]  # not a backed-up disk: left alone
    assert r.disks == {d.old: d.new for d in disks} and r.missing_disks == []
    assert values(argv, "-netdev") == ["tap,id=net0,ifname=tap-web01,script=no,downscript=no,vhost=on"]
    assert values(argv, "-chardev") == [f"socket,server=on,wait=off,id=qga0,path={W}/qga0.sock"]
    assert r.guest_agent == f"{W}/qga0.sock"
    assert values(argv, "-qmp") == [f"unix:{W}/qmp.sock,server=on,wait=off"] and r.qmp == f"{W}/qmp.sock"
    assert values(argv, "-monitor") == [f"unix:{W}/monitor.sock,server=on,wait=off"]
    assert values(argv, "-serial") == [f"file:{W}/console.log"]
    assert values(argv, "-vnc") == [f"unix:{W}/vnc.sock,password=on"]
    assert values(argv, "-pidfile") == [f"{W}/qemu.pid"] and r.pidfile == f"{W}/qemu.pid"
    assert not [a for a in argv if "/run/vms" in a or "/var/log/vms" in a or "/var/lib/vms" in a]
    # the start script of a daemonizing VM keeps daemonizing, with its pidfile in workdir
    daemon = r.daemon_argv()
    assert daemon[-1] == "-daemonize" and values(daemon, "-pidfile") == [f"{W}/qemu.pid"]
    assert set(r.files) >= {f"{W}/qga0.sock", f"{W}/qmp.sock", f"{W}/qemu.pid", f"{W}/console.log"}


def test_daemonize_without_pidfile_gets_one_in_the_start_script() -> None:
    r = rewrite([QEMU, "-daemonize", "-m", "512"], name="x", workdir=W)
    assert r.argv == [QEMU, "-name", "x"][:1] + ["-m", "512"] and r.daemonize and r.pidfile is None
    assert r.daemon_argv() == [QEMU, "-m", "512", "-pidfile", f"{W}/qemu.pid", "-daemonize"]


def test_name_with_options_and_uuid() -> None:
    argv = [QEMU, "-name", "guest=db01,debug-threads=on,process=db01", "-uuid", "0d6c4bd4-2b49-4ad2-9f4c-111111111111"]
    kept = rewrite(argv, name="db01-copy", workdir=W)
    assert values(kept.argv, "-name") == ["guest=db01-copy,debug-threads=on,process=db01-copy"]
    assert values(kept.argv, "-uuid") == ["0d6c4bd4-2b49-4ad2-9f4c-111111111111"]
    new = rewrite(argv, name="db01-copy", workdir=W, uuid="new")
    [uuid] = values(new.argv, "-uuid")
    assert re.fullmatch(r"[0-9a-f-]{36}", uuid) and uuid != "0d6c4bd4-2b49-4ad2-9f4c-111111111111"


def test_blockdev_key_value_nested_and_chained() -> None:
    argv = [
        QEMU,
        # the test guest's form: the protocol node inline under the format node
        "-blockdev", "driver=qcow2,node-name=root,file.driver=file,file.filename=/vm/root.qcow2,backing=base0",
        "-device", "virtio-blk-pci,drive=root",
        # libvirt's form: a protocol node, then a format node naming it
        "-blockdev", "driver=file,filename=/vm/data.qcow2,node-name=data-file,discard=unmap",
        "-blockdev", "node-name=data,driver=qcow2,file=data-file,lazy-refcounts=on",
        "-device", "virtio-blk-pci,drive=data",
        # a raw protocol node straight under its device
        "-blockdev", "driver=host_device,filename=/dev/vg0/scratch,node-name=scratch",
        "-device", "virtio-blk-pci,drive=scratch",
    ]  # fmt: skip
    disks = [
        DiskMap("/vm/root.qcow2", f"{W}/root.raw", "raw"),
        DiskMap("/vm/data.qcow2", f"{W}/data.raw", "raw"),
        DiskMap("/dev/vg0/scratch", f"{W}/scratch.qcow2", "qcow2"),
    ]
    r = rewrite(argv, name="x", workdir=W, disks=disks)
    assert values(r.argv, "-blockdev") == [
        f"driver=raw,node-name=root,file.driver=file,file.filename={W}/root.raw",
        f"driver=file,filename={W}/data.raw,node-name=data-file,discard=unmap",
        "node-name=data,driver=raw,file=data-file",
        f"driver=qcow2,node-name=scratch,file.driver=file,file.filename={W}/scratch.qcow2",
    ]
    assert r.missing_disks == []


def test_blockdev_json_as_libvirt_writes_it() -> None:
    storage = {
        "driver": "file",
        "filename": "/var/lib/libvirt/images/web01.qcow2",
        "node-name": "libvirt-1-storage",
        "auto-read-only": True,
        "discard": "unmap",
    }
    fmt = {"node-name": "libvirt-1-format", "read-only": False, "driver": "qcow2", "file": "libvirt-1-storage"}
    argv = [QEMU, "-blockdev", json.dumps(storage), "-blockdev", json.dumps(fmt)]
    r = rewrite(argv, name="x", workdir=W, disks=[DiskMap(storage["filename"], f"{W}/d.qcow2", "qcow2")])
    new_storage, new_fmt = (json.loads(v) for v in values(r.argv, "-blockdev"))
    assert new_storage == dict(storage, filename=f"{W}/d.qcow2")
    assert new_fmt == fmt  # same format: untouched
    to_raw = rewrite(argv, name="x", workdir=W, disks=[DiskMap(storage["filename"], f"{W}/d.raw", "raw")])
    assert json.loads(values(to_raw.argv, "-blockdev")[1])["driver"] == "raw"


def test_json_blockdev_inline_file() -> None:
    node = {"driver": "qcow2", "node-name": "d0", "file": {"driver": "file", "filename": "/vm/a.qcow2"}}
    r = rewrite([QEMU, "-blockdev", json.dumps(node)], name="x", workdir=W, disks=[DiskMap("/vm/a.qcow2", "/n/a")])
    assert json.loads(r.argv[2]) == {
        "driver": "qcow2",
        "node-name": "d0",
        "file": {"driver": "file", "filename": "/n/a"},
    }


def test_disks_from_restore_point_metadata_and_missing_ones() -> None:
    saved = [{"device": "", "filename": "/vm/a.qcow2"}, {"device": "", "filename": "/vm/gone.qcow2"}]
    maps = disk_maps(saved, ["/n/a.qcow2", "/n/b.qcow2"], "qcow2")
    r = rewrite([QEMU, "-hda", "/vm/a.qcow2"], name="x", workdir=W, disks=maps)
    assert r.argv == [QEMU, "-drive", "file=/n/a.qcow2,format=qcow2,index=0,media=disk"]
    assert r.missing_disks == ["/vm/gone.qcow2"]


def test_comma_in_a_path_stays_escaped() -> None:
    argv = [QEMU, "-drive", "file=/vm/a,,b.img,format=raw"]
    r = rewrite(argv, name="x", workdir=W, disks=[DiskMap("/vm/a,b.img", "/n/c,d.qcow2", "qcow2")])
    assert values(r.argv, "-drive") == ["file=/n/c,,d.qcow2,format=qcow2"]


def test_incoming_loadvm_and_inherited_fds_are_dropped_with_a_note() -> None:
    argv = [
        QEMU, "-incoming", "defer", "-loadvm", "before-upgrade", "-add-fd", "fd=3,set=1",
        "-netdev", "tap,fd=33,id=hostnet0,vhost=on,vhostfd=34",
        "-device", "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:aa:00:01",
        "-chardev", "socket,id=charmonitor,fd=27,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
    ]  # fmt: skip
    r = rewrite(argv, name="x", workdir=W)
    assert "-incoming" not in r.argv and "-loadvm" not in r.argv and "-add-fd" not in r.argv
    assert values(r.argv, "-netdev") == ["user,id=hostnet0"]
    assert values(r.argv, "-chardev") == [f"socket,id=charmonitor,server=on,wait=off,path={W}/charmonitor.sock"]
    assert r.qmp == f"{W}/charmonitor.sock"  # the QMP monitor on a chardev (libvirt's way)
    assert len(r.notes) == 4 and any("file descriptors" in n for n in r.notes)


def test_tcp_chardev_for_the_guest_agent_moves_to_a_socket_client_chardev_stays() -> None:
    argv = [
        QEMU,
        "-chardev", "socket,id=ga,host=127.0.0.1,port=4000,server=on,wait=off",
        "-device", "virtserialport,chardev=ga,name=org.qemu.guest_agent.0",
        "-chardev", "socket,id=vhost0,path=/run/vhost-user.sock",
        "-chardev", "file,id=log0,path=/var/log/vm-debug.log",
    ]  # fmt: skip
    r = rewrite(argv, name="x", workdir=W)
    assert values(r.argv, "-chardev") == [
        f"socket,id=ga,server=on,wait=off,path={W}/ga.sock",
        "socket,id=vhost0,path=/run/vhost-user.sock",
        f"file,id=log0,path={W}/log0.log",
    ]
    assert r.guest_agent == f"{W}/ga.sock"


def test_display_and_spice() -> None:
    argv = [QEMU, "-display", "vnc=0.0.0.0:1,websocket=5701", "-spice", "port=5930,addr=0.0.0.0,disable-ticketing=on"]
    r = rewrite(argv, name="x", workdir=W)
    assert values(r.argv, "-display") == [f"vnc=unix:{W}/vnc.sock"]
    assert values(r.argv, "-spice") == [f"disable-ticketing=on,unix=on,addr={W}/spice.sock"]
    assert rewrite([QEMU, "-display", "none", "-vnc", "none"], name="x", workdir=W).argv[1:] == [
        "-display",
        "none",
        "-vnc",
        "none",
    ]


# ---- network ----------------------------------------------------------------------------------

NETS = [
    QEMU,
    "-netdev", "bridge,id=lan,br=br0",
    "-device", "virtio-net-pci,netdev=lan,mac=52:54:00:12:00:01,addr=0x3",
    "-netdev", '{"type": "user", "id": "wan", "hostfwd": [{"str": "tcp::2222-:22"}]}',
    "-device", '{"driver": "e1000", "netdev": "wan", "mac": "52:54:00:12:00:02"}',
    "-nic", "user,model=virtio-net-pci,mac=52:54:00:12:00:03,hostfwd=tcp::8080-:80",
]  # fmt: skip


def test_network_kept_and_macs_kept() -> None:
    r = rewrite(NETS, name="x", workdir=W)
    assert r.argv == NETS
    assert [n.mac for n in r.nics] == ["52:54:00:12:00:01", "52:54:00:12:00:02", "52:54:00:12:00:03"]
    assert not any(n.mac_changed for n in r.nics)


def test_new_macs_for_a_copy_beside_the_original() -> None:
    used: set[str] = set()
    r = rewrite(NETS, name="x", workdir=W, macs="new", used_macs=used)
    macs = [n.mac for n in r.nics]
    assert all(m and NEW_MAC.fullmatch(m) for m in macs) and len(set(macs)) == 3
    assert not {"52:54:00:12:00:01", "52:54:00:12:00:02", "52:54:00:12:00:03"} & set(macs)
    assert all(n.mac_changed for n in r.nics) and used == set(macs)
    devices = values(r.argv, "-device")
    assert devices[0] == f"virtio-net-pci,netdev=lan,addr=0x3,mac={macs[0]}"
    assert json.loads(devices[1])["mac"] == macs[1]
    assert values(r.argv, "-nic") == [f"user,model=virtio-net-pci,hostfwd=tcp::8080-:80,mac={macs[2]}"]
    assert values(r.argv, "-netdev")[0] == "bridge,id=lan,br=br0"  # backends kept


def test_network_user() -> None:
    r = rewrite(NETS, name="x", workdir=W, network=NetworkMap.parse("user"))
    assert values(r.argv, "-netdev") == ["user,id=lan", json.dumps({"type": "user", "id": "wan"})]
    assert values(r.argv, "-nic") == ["user,model=virtio-net-pci,mac=52:54:00:12:00:03"]
    assert "hostfwd" not in " ".join(r.argv)  # a restored copy must not take the original's ports


def test_network_bridge() -> None:
    r = rewrite(NETS, name="x", workdir=W, network=NetworkMap.parse("bridge:br-restore"))
    assert values(r.argv, "-netdev") == [
        "bridge,id=lan,br=br-restore",
        json.dumps({"type": "bridge", "id": "wan", "br": "br-restore"}),
    ]
    assert values(r.argv, "-nic") == ["bridge,br=br-restore,model=virtio-net-pci,mac=52:54:00:12:00:03"]


def test_network_tap_one_name_or_one_per_backend() -> None:
    one = [QEMU, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    r = rewrite(one, name="x", workdir=W, network=NetworkMap.parse("tap:tap-restore"))
    assert values(r.argv, "-netdev") == ["tap,id=n0,ifname=tap-restore,script=no,downscript=no"]
    assert r.nics[0].tap == "tap-restore"
    with pytest.raises(InvalidArgument, match="one tap"):
        rewrite(NETS, name="x", workdir=W, network=NetworkMap.parse("tap:tap-restore"))
    numbers = itertools.count()
    r = rewrite(NETS, name="x", workdir=W, network=NetworkMap("tap", tap=lambda: f"t{next(numbers)}"))
    assert [n.tap for n in r.nics] == ["t0", "t1", "t2"]


def test_network_none_unplugs_the_nics_and_keeps_their_devices() -> None:
    r = rewrite(NETS, name="x", workdir=W, network=NetworkMap.parse("none"))
    assert values(r.argv, "-netdev") == []
    assert values(r.argv, "-device")[0] == "virtio-net-pci,addr=0x3,mac=52:54:00:12:00:01"
    assert json.loads(values(r.argv, "-device")[1]) == {"driver": "e1000", "mac": "52:54:00:12:00:02"}
    assert values(r.argv, "-nic") == ["none"]  # the -nic NIC is gone, and QEMU adds no default one


def test_default_nic_made_explicit() -> None:
    r = rewrite([QEMU, "-m", "512"], name="x", workdir=W, macs="new")
    [nic] = r.nics
    assert r.argv == [QEMU, "-m", "512", "-nic", f"user,mac={nic.mac}"]
    assert rewrite([QEMU, "-m", "512"], name="x", workdir=W).argv == [QEMU, "-m", "512"]
    assert rewrite([QEMU, "-nodefaults"], name="x", workdir=W, macs="new").argv == [QEMU, "-nodefaults"]


def test_bad_network_words() -> None:
    for text in ("wifi", "tap", "bridge", "user:x"):
        with pytest.raises(InvalidArgument):
            NetworkMap.parse(text)
    with pytest.raises(InvalidArgument, match="legacy -net"):
        rewrite([QEMU, "-net", "nic", "-net", "user"], name="x", workdir=W, network=NetworkMap("user"))
    assert rewrite([QEMU, "-net", "nic", "-net", "user"], name="x", workdir=W).argv[1:] == [
        "-net",
        "nic",
        "-net",
        "user",
    ]


# ---- the rewritten line is one QEMU accepts ----------------------------------------------------------


@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"needs {QEMU}")
def test_qemu_starts_the_rewritten_daemonizing_command_line(tmp_path: Path) -> None:
    """The saved line of a daemonizing VM (raw disk, JSON blockdev, tap NIC, qga, VNC) rewritten onto a
    qcow2 copy and user networking: QEMU starts it (paused) and shows the new pieces over QMP."""
    from surepoint.vm.qmp import QmpConnection

    src = tmp_path / "orig.img"
    copy = tmp_path / "restored" / "disk0.qcow2"
    copy.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(src), "16M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(copy), "16M"], check=True)
    saved = [
        QEMU, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-S", "-m", "128", "-display", "none",
        "-name", "orig",
        "-blockdev", json.dumps({"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": str(src)}}),
        "-device", "virtio-blk-pci,drive=d0",
        "-netdev", "tap,id=n0,ifname=tap-nowhere,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:00:09",
        "-chardev", "socket,id=qga0,path=/nonexistent/qga.sock,server=on,wait=off",
        "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-qmp", "unix:/nonexistent/qmp.sock,server=on,wait=off",
        "-vnc", "127.0.0.1:77",
        "-pidfile", "/nonexistent/orig.pid", "-daemonize",
    ]  # fmt: skip
    r = rewrite(
        saved,
        name="orig-restored",
        workdir=str(copy.parent),
        disks=[DiskMap(str(src), str(copy), "qcow2")],
        network=NetworkMap("user"),
        macs="new",
    )
    assert r.daemonize
    proc = subprocess.run(r.daemon_argv(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the parent exits at once: the daemon runs on
    pid = int(Path(r.pidfile or "").read_text())
    try:
        with QmpConnection(r.qmp) as qmp:
            assert qmp.execute("query-name")["name"] == "orig-restored"
            [block] = [b for b in qmp.execute("query-block") if b.get("inserted")]
            assert block["inserted"]["file"] == str(copy) and block["inserted"]["drv"] == "qcow2"
            net = qmp.execute("human-monitor-command", **{"command-line": "info network"})
            assert f"macaddr={r.nics[0].mac}" in net and "user" in net
            assert qmp.execute("query-vnc")["enabled"]
            qmp.execute("quit")
    finally:
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)
