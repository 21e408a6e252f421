"""Recreate a VM from a restore point, or put single disks back into an existing VM.

`restore_vm` restores every disk of a VM restore point into a storage directory and recreates the
VM there:

* a libvirt domain (the restore point holds its XML) is defined again from that XML: new name,
  disks pointing to the restored images, powered off unless asked to start. Restoring beside the
  original (a domain with the saved UUID or name still exists) gives the copy a new UUID and new
  MACs; restoring a domain that is gone brings its identity back.
* a plain QEMU VM gets its saved command line rewritten (surepoint.vm.command_line) into a start
  script in the work directory: restored disks, sockets and pidfile in the work directory, new name,
  network and MACs as asked. A VM that daemonized (`-daemonize -pidfile F`) still does from its
  start script; `start=True` runs QEMU in the foreground of a session of its own instead, so the
  process watched is QEMU itself, never a parent that exits at once.

`restore_disks_into` writes chosen disks of a restore point over the disks of an existing VM that
is stopped (a running VM, or an image QEMU holds locked, is refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.errors import InUse, InvalidArgument, NotAVmBackup, NotFound, TargetError
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.repo.restore import restore_disk
from surepoint.vm import libvirt_domain
from surepoint.vm.boot import log_tail, start_qemu, wait_for_guest_agent
from surepoint.vm.command_line import NetworkMap, disk_maps, rewrite
from surepoint.vm.errors import GuestAgentError
from surepoint.vm.inventory import running_vms

FORMATS = ("qcow2", "raw")
START_CHECK_SECONDS = 3.0  # a VM without guest agent: QEMU must still run after this long


@dataclass
class VmRestoreOptions:
    workdir: str | None = None  # start script, sockets, pidfile, logs (plain QEMU); default: storage
    storage: str | None = None  # the restored disk images; default: workdir
    name: str | None = None  # default: see restore_vm
    disk_format: str = "qcow2"
    start: bool = False
    boot_timeout: float = 300
    as_libvirt: bool | None = None  # None: libvirt when the restore point has a domain XML
    libvirt_uri: str | None = None
    network: str = "keep"  # plain QEMU: keep | none | user | tap:NAME | bridge:NAME
    new_macs: bool | None = None  # None: new when restoring beside the original


@dataclass
class VmRestoreResult:
    restore_point: str
    name: str
    kind: str  # "libvirt" or "qemu"
    disks: list[str]
    storage: str
    notes: list[str] = field(default_factory=list)
    start_script: str | None = None
    argv: list[str] = field(default_factory=list)
    domain_uuid: str | None = None
    libvirt_uri: str | None = None
    new_identity: bool = False
    started: bool = False
    pid: int | None = None
    boot_seconds: float | None = None
    guest_agent: str | None = None
    qmp: str | None = None
    macs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _vm_metadata(point: RestorePoint) -> dict:
    vm = point.metadata.get("vm")
    if not vm:
        raise NotAVmBackup(f"restore point {point.id} ({point.name}) is not a VM backup")
    return vm


def _restore_image(repository: Repository, point: RestorePoint, number: int, path: str, disk_format: str) -> None:
    """Disk `number` of `point` as an image at `path` (written beside it first, renamed when complete)."""
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    raw = partial + ".raw"
    for leftover in (partial, raw):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    try:
        restore_disk(repository, point, number, raw if disk_format == "qcow2" else partial)
        if disk_format == "qcow2":
            proc = subprocess.run(
                ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, partial],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            if proc.returncode != 0:
                raise TargetError(f"qemu-img convert failed: {proc.stderr.strip()}")
        with contextlib.suppress(FileNotFoundError):  # over an existing image: keep its owner and mode
            st = os.stat(path)
            os.chmod(partial, st.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):
                os.chown(partial, st.st_uid, st.st_gid)
        os.replace(partial, path)
    finally:
        for leftover in (partial, raw):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def restore_vm(
    repository: Repository,
    point: RestorePoint,
    options: VmRestoreOptions,
    *,
    log: Callable[[str], None] | None = None,
) -> VmRestoreResult:
    """Restore the VM of `point` (see the module docstring); the disks never overwrite a file."""
    say = log or (lambda _m: None)
    vm = _vm_metadata(point)
    if options.disk_format not in FORMATS:
        raise InvalidArgument(f"a restored disk is qcow2 or raw, not {options.disk_format!r}")
    as_libvirt = options.as_libvirt if options.as_libvirt is not None else bool(vm.get("domain_xml"))
    if as_libvirt and not vm.get("domain_xml"):
        raise NotAVmBackup(f"restore point {point.id} has no libvirt domain XML (it is a plain QEMU VM)")
    if not as_libvirt and not vm.get("command_line") and vm.get("domain_xml"):
        raise NotAVmBackup(f"restore point {point.id} has no saved QEMU command line, only a libvirt domain")
    storage = options.storage or options.workdir
    if not storage:
        raise InvalidArgument("give a directory for the restored disks")
    storage = os.path.abspath(storage)
    workdir = os.path.abspath(options.workdir or storage)
    if as_libvirt:
        return _restore_libvirt(repository, point, vm, storage, options, say)
    return _restore_qemu(repository, point, vm, storage, workdir, options, say)


def _image_paths(point: RestorePoint, storage: str, prefix: str, names: list[str], disk_format: str) -> list[str]:
    paths = []
    for disk, name in zip(point.disks, names, strict=True):
        base = os.path.basename(name) or f"disk{disk.number}"
        path = os.path.join(storage, f"{prefix}{base}.{disk_format}")
        if os.path.lexists(path):
            raise InUse(f"{path} exists: restore into another storage directory, or remove it first")
        paths.append(path)
    return paths


def _restore_images(
    repository: Repository, point: RestorePoint, paths: list[str], disk_format: str, say: Callable[[str], None]
) -> None:
    done: list[str] = []
    try:
        for disk, path in zip(point.disks, paths, strict=True):
            say(f"restoring disk {disk.number} ({disk.name}, {disk.size} bytes) to {path}")
            _restore_image(repository, point, disk.number, path, disk_format)
            done.append(path)
    except BaseException:
        for path in done:  # nothing half restored stays behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise


# ---- libvirt --------------------------------------------------------------------------------------


def _restore_libvirt(
    repository: Repository,
    point: RestorePoint,
    vm: dict,
    storage: str,
    options: VmRestoreOptions,
    say: Callable[[str], None],
) -> VmRestoreResult:
    saved_xml = vm["domain_xml"]
    uri = options.libvirt_uri or vm.get("libvirt_uri") or libvirt_domain.configured_uri()
    conn = libvirt_domain.connect(uri)
    try:
        original = libvirt_domain.saved_name(saved_xml) or point.name
        uuid = libvirt_domain.saved_uuid(saved_xml)
        original_exists = libvirt_domain.domain_exists(conn, name=original) or (
            uuid is not None and libvirt_domain.domain_exists(conn, uuid=uuid)
        )
        name = options.name or (f"{original}-restored" if original_exists else original)
        if libvirt_domain.domain_exists(conn, name=name):
            raise InUse(f"libvirt already has a domain named {name}: choose another name")
        new_identity = original_exists if options.new_macs is None else options.new_macs
        if original_exists and uuid is not None and not new_identity:
            raise InvalidArgument(f"domain {original} still exists: a copy beside it needs a new UUID and new MACs")
        os.makedirs(storage, exist_ok=True)
        targets = [d.name for d in point.disks]
        paths = _image_paths(point, storage, f"{name}-", targets, options.disk_format)
        _restore_images(repository, point, paths, options.disk_format, say)
        disks = [
            libvirt_domain.RestoredDisk(target, path, options.disk_format)
            for target, path in zip(targets, paths, strict=True)
        ]
        xml, notes = libvirt_domain.restored_domain_xml(
            saved_xml, name, disks, new_identity=new_identity, files_dir=storage
        )
        try:
            dom = libvirt_domain.define_domain(conn, xml)
        except BaseException:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        for note in notes:
            say(note)
        result = VmRestoreResult(
            restore_point=point.id,
            name=name,
            kind="libvirt",
            disks=paths,
            storage=storage,
            notes=notes,
            domain_uuid=dom.UUIDString(),
            libvirt_uri=uri,
            new_identity=new_identity,
            macs=_domain_macs(dom),
        )
        _write_record(storage, f"{name}.json", point, result, vm)
        say(f"libvirt domain {name} defined ({'new identity' if new_identity else 'same UUID and MACs'})")
        if options.start:
            started = time.monotonic()
            libvirt_domain.start_domain(dom)
            result.started = True
            if libvirt_domain.agent_channel(xml):
                _wait_libvirt_agent(name, uri, options.boot_timeout)
                result.boot_seconds = round(time.monotonic() - started, 2)
        return result
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _domain_macs(dom) -> list[str]:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(dom.XMLDesc(0))
    return [m.get("address", "") for m in root.iterfind("./devices/interface/mac")]


def _wait_libvirt_agent(name: str, uri: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with libvirt_domain.LibvirtGuestAgent(name, uri, timeout=5):
                return
        except GuestAgentError:
            if time.monotonic() > deadline:
                raise TargetError(
                    f"the restored domain {name} did not answer on its guest agent within {timeout:.0f} s"
                ) from None
            time.sleep(1)


# ---- plain QEMU -----------------------------------------------------------------------------------


def _restore_qemu(
    repository: Repository,
    point: RestorePoint,
    vm: dict,
    storage: str,
    workdir: str,
    options: VmRestoreOptions,
    say: Callable[[str], None],
) -> VmRestoreResult:
    name = options.name or f"{point.name}-restored"
    network = NetworkMap.parse(options.network)
    saved_argv = vm.get("command_line") or []
    # beside the original (it still runs): new MACs, unless asked otherwise
    original_running = any(v.name == point.name for v in _quiet_running_vms())
    new_macs = original_running if options.new_macs is None else options.new_macs
    os.makedirs(storage, exist_ok=True)
    os.makedirs(workdir, exist_ok=True)
    names = [f"disk{d.number}-{os.path.basename(d.name) or 'disk'}" for d in point.disks]
    paths = _image_paths(point, storage, "", names, options.disk_format)
    if saved_argv:  # check the command line before writing gigabytes
        rewritten = rewrite(
            saved_argv,
            name=name,
            workdir=workdir,
            disks=disk_maps(vm.get("disks", []), paths, options.disk_format),
            network=network,
            macs="new" if new_macs else "keep",
            uuid="new" if new_macs else None,
        )
        argv = rewritten.argv
        script_argv = rewritten.daemon_argv() if rewritten.daemonize else argv
        notes = list(rewritten.notes)
        notes += [f"disk {old} is not on the saved command line" for old in rewritten.missing_disks]
        qmp, agent = rewritten.qmp, rewritten.guest_agent
        macs = [n.mac for n in rewritten.nics if n.mac]
    else:
        qmp = os.path.join(workdir, "qmp.sock")
        argv = ["qemu-system-x86_64", "-name", name, "-machine", "q35", "-m", "1024", "-display", "none"]
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        for path in paths:
            argv += ["-drive", f"file={path},format={options.disk_format},if=virtio"]
        script_argv, notes, agent, macs = argv, ["no saved command line: a minimal one was written"], None, []
    _restore_images(repository, point, paths, options.disk_format, say)
    for note in notes:
        say(note)
    script = os.path.join(workdir, "start-vm.sh")
    with open(script, "w") as f:
        f.write(
            f"#!/bin/sh\n# Recreated by surepoint from restore point {point.id}\n"
            "exec " + " ".join(shlex.quote(a) for a in script_argv) + "\n"
        )
    os.chmod(script, 0o755)
    result = VmRestoreResult(
        restore_point=point.id,
        name=name,
        kind="qemu",
        disks=paths,
        storage=storage,
        notes=notes,
        start_script=script,
        argv=argv,
        new_identity=new_macs,
        guest_agent=agent,
        qmp=qmp,
        macs=macs,
    )
    _write_record(workdir, "vm.json", point, result, vm)
    if options.start:
        _boot(result, workdir, options.boot_timeout)
    return result


def _quiet_running_vms() -> list:
    try:
        return running_vms()
    except Exception:  # noqa: BLE001 - only a hint for the default of new MACs
        return []


def _write_record(directory: str, filename: str, point: RestorePoint, result: VmRestoreResult, vm: dict) -> None:
    with open(os.path.join(directory, filename), "w") as f:
        json.dump({"restore_point": point.id, **result.to_json(), "original": vm}, f, indent=2)


def _boot(result: VmRestoreResult, workdir: str, timeout: float) -> None:
    """Start QEMU itself (never daemonized, see the module docstring) and wait until the VM is up."""
    log_path = os.path.join(workdir, "qemu.log")
    for path in (result.qmp, result.guest_agent):
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    started = time.monotonic()
    proc = start_qemu(result.argv, log_path)
    result.pid = proc.pid
    result.started = True
    try:
        if result.guest_agent is not None:
            wait_for_guest_agent(proc, result.guest_agent, timeout, log_path=log_path, interval=1.0)
        else:  # nothing to ask: QEMU must at least keep running
            deadline = time.monotonic() + START_CHECK_SECONDS
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise TargetError(f"QEMU exited with {proc.returncode} at start: {log_tail(log_path)}")
                time.sleep(0.2)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(10)
        raise
    result.boot_seconds = round(time.monotonic() - started, 2)


# ---- single disks into an existing VM ----------------------------------------------------------------


@dataclass
class DiskIntoVm:
    device: str  # as asked: a disk name of the restore point (vda, root) or its number
    number: int  # disk number in the restore point
    path: str  # the VM's image that was overwritten
    format: str


def _qemu_image_format(path: str) -> str:
    """The format of an existing image; InUse when a running QEMU holds it (QEMU's image locks)."""
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", path], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        message = proc.stderr.strip()
        if "lock" in message:
            raise InUse(f"{path} is in use by a running QEMU ({message.splitlines()[-1]}): stop the VM first")
        raise TargetError(f"cannot read the VM's image {path}: {message}")
    fmt = json.loads(proc.stdout).get("format", "raw")
    return fmt if fmt in FORMATS else "raw"


def restore_disks_into(
    repository: Repository,
    point: RestorePoint,
    devices: list[str],
    vm_name: str | None = None,
    *,
    libvirt_uri: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[DiskIntoVm]:
    """Overwrite the named disks of a stopped VM with the disks of `point` (same device names).

    The VM is `vm_name` (default: the restore point's VM): a libvirt domain when the restore point
    has a domain XML, else the plain QEMU VM whose saved command line names the images.
    """
    say = log or (lambda _m: None)
    vm = _vm_metadata(point)
    if not devices:
        raise InvalidArgument("name at least one disk to restore")
    by_name = {d.name: d for d in point.disks}
    chosen = []
    for device in devices:
        disk = by_name.get(device)
        if disk is None and device.isdigit():
            disk = next((d for d in point.disks if d.number == int(device)), None)
        if disk is None:
            known = ", ".join(f"{d.number} ({d.name})" for d in point.disks)
            raise InvalidArgument(f"restore point {point.id} has no disk {device!r} (disks: {known})")
        chosen.append((device, disk))
    name = vm_name or (libvirt_domain.saved_name(vm["domain_xml"]) if vm.get("domain_xml") else None) or point.name
    targets: dict[int, tuple[str, str | None]] = {}  # disk number -> (image, format, None: as found)
    if vm.get("domain_xml"):
        conn = libvirt_domain.connect(libvirt_uri or vm.get("libvirt_uri"))
        try:
            if not libvirt_domain.domain_exists(conn, name=name):
                raise NotFound(f"libvirt has no domain {name} to restore disks into")
            running, images = libvirt_domain.domain_disks(conn, name)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        if running:
            raise InUse(f"libvirt domain {name} is running: shut it down before restoring its disks")
        for _device, disk in chosen:
            if disk.name not in images:
                raise InvalidArgument(f"domain {name} has no file-backed disk {disk.name} (it has {', '.join(images)})")
            targets[disk.number] = images[disk.name]
    else:
        if any(v.name == name for v in _quiet_running_vms()):
            raise InUse(f"VM {name} is running: stop it before restoring its disks")
        saved = {i: d for i, d in enumerate(vm.get("disks", []))}
        for device, disk in chosen:
            entry = saved.get(disk.number) or {}
            filename = entry.get("filename")
            if not filename or filename.startswith("json:") or not os.path.isdir(os.path.dirname(filename)):
                raise NotFound(
                    f"the image of disk {device} ({filename or 'unknown'}) has no place to go back to: restore "
                    "the whole VM into a storage directory instead"
                )
            targets[disk.number] = (filename, None if os.path.exists(filename) else entry.get("driver"))
    done = []
    for device, disk in chosen:
        path, fmt = targets[disk.number]
        if os.path.exists(path):
            found = _qemu_image_format(path)  # also refuses an image a running QEMU holds
            fmt = fmt if fmt in FORMATS else found
        fmt = fmt if fmt in FORMATS else "raw"
        say(f"restoring disk {disk.number} ({disk.name}) over {path} ({fmt})")
        _restore_image(repository, point, disk.number, path, fmt)
        done.append(DiskIntoVm(device, disk.number, path, fmt))
    return done
