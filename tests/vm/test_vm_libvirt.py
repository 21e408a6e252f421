"""VMs managed by libvirt: the test guest as a transient libvirt domain (type 'qemu': TCG), listed by
`surepoint vm list` and backed up by `surepoint backup vm` with QMP and the guest agent passed through
libvirtd; an incremental backup through the dirty bitmap, a restore that fsck accepts, the domain XML
in the restore point.

Needs libvirt-python (extra 'libvirt') and a libvirtd answering on qemu:///system: scripts/setup-libvirt
provides both. Without them these tests skip, saying why. The XML helpers are tested without libvirtd.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from surepoint.vm import libvirt_domain
from surepoint.vm.errors import GuestAgentCommandError, GuestAgentError, QmpCommandError, QmpError
from surepoint.vm.libvirt_domain import LibvirtGuestAgent, LibvirtQmp, agent_channel, disk_targets, qemu_owner
from tests.conftest import Cli
from tests.vm.conftest import build_test_vm, make_overlay, vm_cache

URI = "qemu:///system"
MiB = 1 << 20

SAMPLE_XML = """<domain type='qemu' id='3'>
  <name>web01</name>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><alias name='sata0-0-0'/></disk>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web01/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+108</label></seclabel>
</domain>"""


# -- without libvirtd -------------------------------------------------------------------------------


def test_domain_xml_helpers() -> None:
    assert agent_channel(SAMPLE_XML) == "/var/lib/libvirt/qemu/channel/target/domain-3-web01/org.qemu.guest_agent.0"
    assert agent_channel("<domain><devices/></domain>") is None
    assert disk_targets(SAMPLE_XML) == {"virtio-disk0": "vda", "sata0-0-0": "sda"}
    assert qemu_owner(SAMPLE_XML) == (64055, 108)
    assert qemu_owner("<domain/>") is None


def test_libvirt_lookup_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(libvirt_domain.URI_ENV, "none")
    assert libvirt_domain.configured_uri() is None
    assert libvirt_domain.running_domains() == []
    assert libvirt_domain.find_domain("anything") is None


def test_plain_qemu_vm_keeps_its_sockets() -> None:
    from surepoint.vm.inventory import VmInfo

    vm = VmInfo("plain", "/nonexistent/qmp.sock", None)
    assert libvirt_domain.domain_metadata(vm) == {}
    with pytest.raises(QmpError, match="cannot connect"):
        libvirt_domain.open_qmp(vm, timeout=2)
    with pytest.raises(GuestAgentError, match="no guest-agent channel"):
        libvirt_domain.open_guest_agent(vm)


# -- the test guest as a libvirt domain ---------------------------------------------------------------


def libvirt_or_skip():
    try:
        import libvirt
    except ImportError:
        pytest.skip("libvirt-python is not installed (run scripts/setup-libvirt, or uv sync --extra libvirt)")
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd does not answer on {URI} (run scripts/setup-libvirt as root): {exc}")
    return libvirt, conn


def domain_xml(name: str, workdir: Path) -> str:
    """The test guest as a transient domain. The cached images under the overlays are declared with
    relabel='no': libvirt would otherwise give them to its QEMU user for good (it does not restore the
    owner of read-only backing images); they are world-readable, which is all QEMU needs."""
    cache = vm_cache()
    disks = "".join(
        f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{escape(str(workdir / f"{disk}.qcow2"))}'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='{escape(str(cache / f"{disk}.qcow2"))}'><seclabel model='dac' relabel='no'/></source>
        <backingStore/>
      </backingStore>
      <target dev='{dev}' bus='virtio'/>
    </disk>"""
        for disk, dev in (("root", "vda"), ("data", "vdb"))
    )
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(cache / "vmlinuz"))}</kernel>
    <initrd>{escape(str(cache / "initrd.img"))}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0 panic=-1 no_timer_check</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disks}
    <serial type='file'><source path='{escape(str(workdir / "console.log"))}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass
class LibvirtVm:
    name: str
    workdir: Path
    boot_seconds: float

    def agent(self, timeout: float = 60.0) -> LibvirtGuestAgent:
        return LibvirtGuestAgent(self.name, URI, timeout)

    def qmp(self) -> LibvirtQmp:
        return LibvirtQmp(self.name, URI)

    def run(self, argv: list[str], timeout: float = 120.0) -> bytes:
        with self.agent(timeout=max(30.0, timeout)) as ga:
            return ga.exec(argv, timeout=timeout, check=True).stdout


@pytest.fixture(scope="module")
def libvirt_vm() -> Iterator[LibvirtVm]:
    """The test guest as a transient libvirt domain (destroyed at the end), booted once for the module."""
    libvirt, conn = libvirt_or_skip()
    build_test_vm()
    # QEMU runs as libvirt's QEMU user: the overlays' directory must be one it can enter
    workdir = Path(tempfile.mkdtemp(prefix="surepoint-libvirt-test-"))
    os.chmod(workdir, 0o755)
    name = f"surepoint-libvirt-test-{os.getpid()}"
    dom = None
    try:
        for disk in ("root", "data"):
            make_overlay(vm_cache() / f"{disk}.qcow2", workdir / f"{disk}.qcow2")
        started = time.monotonic()
        dom = conn.createXML(domain_xml(name, workdir), 0)
        deadline = started + 600
        while True:
            try:
                with LibvirtGuestAgent(name, URI, timeout=5):
                    break
            except GuestAgentError:
                if time.monotonic() > deadline:
                    console = (workdir / "console.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"libvirt domain {name}: guest agent not ready after 600 s: {console}") from None
                time.sleep(1)
        vm = LibvirtVm(name, workdir, time.monotonic() - started)
        # /data is `nofail` with a 10 s device timeout: on a slow TCG boot it may be left unmounted
        vm.run(["sh", "-c", "mountpoint -q /data || mount /data"])
        print(f"\nlibvirt test domain {name} ready after {vm.boot_seconds:.1f} s")
        yield vm
    finally:
        if dom is not None:
            try:
                dom.destroy()  # transient: destroying it also undefines it
            except libvirt.libvirtError:
                pass
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


def backup(cli: Cli, name: str, *args: str) -> dict:
    result = cli.run("backup", "vm", name, *args, "--json", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    [vm] = result.json()["vms"]
    assert vm["status"] == "ok", vm
    return vm


def guest_view_left(vm: LibvirtVm) -> dict:
    with vm.qmp() as qmp:
        nodes = qmp.query_named_block_nodes()
        return {
            "jobs": qmp.query_block_jobs(),
            "exports": qmp.execute("query-block-exports"),
            "temporary_nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("sp-")],
        }


@pytest.mark.kvm
def test_libvirt_qmp_and_agent(libvirt_vm: LibvirtVm) -> None:
    with libvirt_vm.qmp() as qmp:
        devices = qmp.block_devices()
        assert [(d.device, d.driver) for d in devices] == [("vda", "qcow2"), ("vdb", "qcow2")]
        assert qmp.resolve_node("vdb").node_name == devices[1].node_name
        assert qmp.resolve_node("virtio-disk1").node_name == devices[1].node_name  # the libvirt alias
        assert qmp.execute("query-status")["running"] is True
        with pytest.raises(QmpCommandError) as err:
            qmp.execute("blockdev-del", node_name="no-such-node")
        assert err.value.error_class == "GenericError"
        with pytest.raises(QmpError, match="events"):
            qmp.wait_event("JOB_STATUS_CHANGE", timeout=1)
        with pytest.raises(QmpError, match="another surepoint connection"):  # one client, as a QMP socket
            LibvirtQmp(libvirt_vm.name, URI, timeout=0.5)
    with libvirt_vm.agent() as ga:
        ga.ping()
        assert ga.fsfreeze_status() == "thawed"
        ga.write_file("/tmp/sp-libvirt.txt", b"through libvirt\n")
        assert ga.read_file("/tmp/sp-libvirt.txt") == b"through libvirt\n"
        assert ga.exec(["cat", "/tmp/sp-libvirt.txt"], check=True).stdout == b"through libvirt\n"
        with pytest.raises(GuestAgentCommandError, match="No such file"):
            ga.file_open("/nonexistent/file")
        assert ga.fsfreeze_freeze() >= 1
        try:
            assert ga.fsfreeze_status() == "frozen"
        finally:
            ga.fsfreeze_thaw()
        assert ga.fsfreeze_status() == "thawed"


@pytest.mark.kvm
def test_backup_libvirt_domain(libvirt_vm: LibvirtVm, cli: Cli, tmp_path: Path) -> None:
    name = libvirt_vm.name
    cli.run("init", check=True)
    listed = {v["name"]: v for v in cli.run("vm", "list", "--json", check=True).json()}
    assert listed[name]["qmp"] == f"libvirt:{URI}" and listed[name]["pid"], listed[name]
    assert listed[name]["guest_agent"].endswith("org.qemu.guest_agent.0")

    libvirt_vm.run(["sh", "-c", "head -c 4M /dev/urandom > /data/first.bin && sync"])
    first = backup(cli, name)
    assert first["consistency"] == "filesystem" and first["cbt"] == "full read", first
    point = cli.run("show", first["restore_point"], "--json", check=True).json()
    assert [d["name"] for d in point["disks"]] == ["vda", "vdb"]
    meta = point["metadata"]["vm"]
    assert meta["libvirt_uri"] == URI
    assert f"<name>{name}</name>" in meta["domain_xml"] and "org.qemu.guest_agent.0" in meta["domain_xml"]
    assert meta["bitmap_persistent"] is True

    libvirt_vm.run(["sh", "-c", "head -c 2M /dev/urandom > /data/second.bin && sync"])
    second_md5 = libvirt_vm.run(["md5sum", "/data/second.bin"]).split()[0].decode()
    second = backup(cli, name)
    assert second["consistency"] == "filesystem" and second["cbt"] == "dirty bitmap", second
    assert 2 * MiB <= second["read_bytes"] < 64 * MiB, second  # the changed blocks, not 2.25 GiB of disks
    print(f"\nlibvirt domain: full read {first['read_bytes']} bytes, incremental {second['read_bytes']} bytes")

    point = cli.run("show", second["restore_point"], "--json", check=True).json()
    number = next(d["number"] for d in point["disks"] if d["name"] == "vdb")
    restored = tmp_path / "vdb.raw"
    cli.run("restore", second["restore_point"], "--disk", str(number), "--to", str(restored), check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(restored)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumped = tmp_path / "second.bin"
    subprocess.run(["debugfs", "-R", f"dump /second.bin {dumped}", str(restored)], check=True, capture_output=True)
    assert hashlib.md5(dumped.read_bytes()).hexdigest() == second_md5

    assert guest_view_left(libvirt_vm) == {"jobs": [], "exports": [], "temporary_nodes": []}
    with libvirt_vm.agent() as ga:
        assert ga.fsfreeze_status() == "thawed"
    with libvirt_vm.qmp() as qmp:  # only the last restore point's bitmap tracks writes now
        for dev in qmp.block_devices():
            node = qmp.block_node(dev.node_name)
            names = [b["name"] for b in node.get("dirty-bitmaps", []) if b.get("name", "").startswith("surepoint-")]
            assert names == [meta_bitmap(cli, second["restore_point"])], names


def meta_bitmap(cli: Cli, point_id: str) -> str:
    return cli.run("show", point_id, "--json", check=True).json()["metadata"]["vm"]["bitmap"]


# -- restore: the domain defined again ---------------------------------------------------------------

LIVE_XML = """<domain type='kvm' id='7'>
  <name>web01</name>
  <uuid>3e8c1a52-5b07-4a8e-9d3a-6c1f1c0e1a01</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg0/web01' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01-data.qcow2' index='1'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/><source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/><alias name='sata0-0-0'/></disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:01'/>
      <source network='default' portid='0c9b2e0c-1111-2222-3333-444455556666' bridge='virbr0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <serial type='pty'><source path='/dev/pts/4'/><target port='0'/><alias name='serial0'/></serial>
    <serial type='file'><source path='/var/log/vms/web01-console.log'/><target port='1'/></serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web01/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
    </channel>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+108</label><imagelabel>+64055:+108</imagelabel>
  </seclabel>
</domain>"""


def test_restored_domain_xml_beside_the_original() -> None:
    import xml.etree.ElementTree as ET

    disks = [
        libvirt_domain.RestoredDisk("vda", "/srv/restore/web01-restored-vda.qcow2", "qcow2"),
        libvirt_domain.RestoredDisk("vdb", "/srv/restore/web01-restored-vdb.raw", "raw"),
    ]
    used: set[str] = set()
    xml, notes = libvirt_domain.restored_domain_xml(
        LIVE_XML, "web01-restored", disks, new_identity=True, used_macs=used, files_dir="/srv/restore"
    )
    root = ET.fromstring(xml)
    assert root.get("id") is None and root.findtext("name") == "web01-restored" and root.find("uuid") is None
    assert not root.findall(".//alias") and not root.findall(".//seclabel/label")
    vda, vdb, cdrom = root.findall("./devices/disk")
    assert vda.get("type") == "file" and vda.find("source").attrib == {"file": disks[0].path}
    assert vda.find("driver").get("type") == "qcow2" and vda.find("driver").get("cache") == "none"
    assert vdb.find("source").attrib == {"file": disks[1].path} and vdb.find("driver").get("type") == "raw"
    assert vda.find("backingStore") is None and vdb.find("backingStore") is None  # whole images now
    assert cdrom.find("source") is None and cdrom.find("readonly") is not None  # not restored: as it was
    [nic] = root.findall("./devices/interface")
    mac = nic.find("mac").get("address")
    assert mac != "52:54:00:aa:bb:01" and mac.startswith("52:54:00:") and used == {mac}
    assert nic.find("target") is None and nic.find("source").get("network") == "default"
    assert root.find("./devices/channel/source") is None  # libvirt makes a new channel path
    assert root.find("./devices/channel/target").get("state") is None
    pty, console = root.findall("./devices/serial")
    assert pty.find("source") is None
    assert console.find("source").get("path") == "/srv/restore/web01-restored-serial1.log"
    assert root.find("./devices/graphics").get("port") is None  # autoport: a free one at start
    assert notes == []


def test_restored_domain_xml_in_place_of_a_lost_domain() -> None:
    import xml.etree.ElementTree as ET

    xml, _ = libvirt_domain.restored_domain_xml(
        LIVE_XML, "web01", [libvirt_domain.RestoredDisk("vda", "/srv/a.qcow2", "qcow2")], new_identity=False
    )
    root = ET.fromstring(xml)
    assert root.findtext("uuid") == "3e8c1a52-5b07-4a8e-9d3a-6c1f1c0e1a01"
    assert root.find("./devices/interface/mac").get("address") == "52:54:00:aa:bb:01"
    vdb = root.findall("./devices/disk")[1]
    assert vdb.find("source").get("file") == "/var/lib/libvirt/images/web01-data.qcow2"  # not restored: kept


@pytest.mark.kvm
def test_vm_restore_defines_the_libvirt_domain(libvirt_vm: LibvirtVm, cli: Cli, tmp_path: Path) -> None:
    libvirt, conn = libvirt_or_skip()
    name = libvirt_vm.name
    if not cli.repo.exists():
        cli.run("init", check=True)
    point = backup(cli, name)["restore_point"]
    storage = Path(tempfile.mkdtemp(prefix="surepoint-libvirt-restore-"))
    os.chmod(storage, 0o755)  # libvirt's QEMU user must reach the images
    copy = f"{name}-restored"
    try:
        result = cli.run("vm", "restore", point, "--storage", str(storage), "--json", timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        restored = result.json()
        assert restored["kind"] == "libvirt" and restored["name"] == copy and restored["new_identity"]
        dom = conn.lookupByName(copy)
        assert not dom.isActive() and dom.isPersistent()  # defined, powered off
        assert dom.UUIDString() != conn.lookupByName(name).UUIDString()
        xml = dom.XMLDesc(0)
        sources = [s for s in restored["disks"]]
        assert sources == [str(storage / f"{copy}-vda.qcow2"), str(storage / f"{copy}-vdb.qcow2")]
        assert all(f"<source file='{s}'" in xml or f'<source file="{s}"' in xml for s in sources), xml
        assert str(libvirt_vm.workdir) not in xml  # nothing of the original's disks
        # libvirt accepts it and its QEMU opens the restored images (started paused: no second boot)
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        try:
            assert dom.isActive()
        finally:
            dom.destroy()
        # single disks: refused into the running original, restored into the stopped copy
        busy = cli.run("vm", "restore", point, "--disk", "vdb")
        assert busy.returncode == 2 and "running" in busy.stderr, busy.stderr
        shutil.copy(sources[1], tmp_path / "vdb-before.qcow2")
        Path(sources[1]).unlink()  # lost
        into = cli.run("vm", "restore", point, "--disk", "vdb", "--into", copy, "--json")
        assert into.returncode == 0, into.stderr
        assert into.json()["disks"][0]["format"] == "qcow2"  # as the domain declares it
        same = subprocess.run(["qemu-img", "compare", str(tmp_path / "vdb-before.qcow2"), sources[1]])
        assert same.returncode == 0
        again = cli.run("vm", "restore", point, "--storage", str(tmp_path / "other"), "--name", copy)
        assert again.returncode == 2 and "already has a domain" in again.stderr
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(copy).undefine()
        conn.close()
        shutil.rmtree(storage, ignore_errors=True)
