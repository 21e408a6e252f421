"""An open lab (`surepoint lab open`): restore points booted in the isolated lab and left running, with one door.

The application group's VMs boot first, in order, each passing its tests, then the restore points
given (as `lab verify` does, surepoint.lab.verification), but nothing is stopped afterwards and no
verification is recorded. Once the exposed service answers inside the lab (a database server: once it
takes clients, not merely listens, surepoint.lab.greetings), the door process starts
(surepoint.lab.door): this host's 127.0.0.1:PORT forwarded to that one address and port in the
lab's namespace, nothing else in or out. The door process becomes the lab's owner; `close_lab`
stops it and tears the lab down. A lab whose door died is a leftover like any dead lab.

The lab's bridge needs an address in the exposed service's network for the door to reach it: when
the lab file gives none there, the last host address of the service's /24 (or the one before, if
the service has it) is added.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.catalog import Catalog
from surepoint.errors import InvalidArgument, NeedsRoot, SurepointError
from surepoint.events import Component, Outcome, Phase
from surepoint.lab.door import start_door
from surepoint.lab.greetings import PROTOCOLS, protocol_for_port
from surepoint.lab.lab_file import LabConfig
from surepoint.lab.network import LabNetwork, namespace_for
from surepoint.lab.probe import run_probe
from surepoint.lab.records import LabState, clean_leftovers, load_labs, new_lab_id, teardown_lab
from surepoint.lab.report import PASSED
from surepoint.lab.verification import Lab, check_bootable
from surepoint.mount.manager import MountOptions
from surepoint.processes import process_start
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository

SERVICE_WAIT = 300.0  # seconds for the exposed service to answer after the VMs booted
DOOR_STARTS = 10.0


class LabNotOpened(SurepointError):
    """A VM of the lab did not boot or failed its tests, or the exposed service never answered."""


@dataclass
class OpenedLab:
    lab_id: str
    door: str  # 127.0.0.1:PORT
    target: str  # ADDRESS:PORT in the lab
    vms: list[dict] = field(default_factory=list)  # name, restore point, addresses, boot seconds
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def parse_expose(text: str) -> tuple[str, int]:
    """GUEST_IP:PORT (IPv6 in brackets) -> (address, port)."""
    address, sep, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
        number = int(port)
    except ValueError:
        raise InvalidArgument(f"--expose {text!r}: give the service as GUEST_IP:PORT, e.g. 10.0.2.15:5432") from None
    if not sep or not 0 < number < 65536:
        raise InvalidArgument(f"--expose {text!r}: give the service as GUEST_IP:PORT, e.g. 10.0.2.15:5432")
    return str(ip), number


def bind_door(port: int) -> socket.socket:
    """The door's listening socket on this host's 127.0.0.1 (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise InvalidArgument(f"cannot open the door on 127.0.0.1:{port}: {exc.strerror}") from None
    return sock


def with_door_address(config: LabConfig, address: str) -> LabConfig:
    """The lab's addresses, plus one in the service's network when none is there (the door connects from it)."""
    ip = ipaddress.ip_address(address)
    for existing in config.addresses:
        if ip in ipaddress.ip_interface(existing).network:
            return config
    network = ipaddress.ip_network(f"{address}/{24 if ip.version == 4 else 64}", strict=False)
    last = network.broadcast_address - 1 if ip.version == 4 else network.network_address + 0xFFFE
    mine = last if last != ip else last - 1
    config.addresses = [*config.addresses, f"{mine}/{network.prefixlen}"]
    return config


class OpenLab(Lab):
    def open(self, address: str, port: int, listener: socket.socket, protocol: str = "tcp") -> OpenedLab:
        if os.geteuid() != 0:
            raise NeedsRoot("the lab needs root (a network namespace, FUSE mounts of the repository)")
        if not self.targets:
            raise InvalidArgument("no restore point to open")
        if self.config.network != "isolated":
            raise InvalidArgument('a lab with network = "none" has no network for a door')
        self.keep_running = True
        clean_leftovers(self.say)
        group = [(spec, self.repository.resolve(spec.restore_point or "")) for spec in self.config.group]
        for point in [p for _s, p in group] + self.targets:
            check_bootable(point)
        lab_id = new_lab_id()
        started = time.monotonic()
        self.deadline = started + self.config.timeout
        state = LabState(lab_id, namespace_for(lab_id))
        state.points = [p.id for _s, p in group] + [p.id for p in self.targets]
        state.save()
        self.events.record(Component.LAB, Phase.START, Outcome.OK, f"lab {lab_id} opening to expose {address}:{port}")
        try:
            self.network = LabNetwork.create(state.namespace, self.config.addresses, isolated=True)
            vms = []
            plan = [*group, *((self.config.spec_for(p.name), p) for p in self.targets)]
            for number, (spec, point) in enumerate(plan):
                result = self._run_vm(spec, point, number, state)
                if result.outcome != PASSED:
                    raise LabNotOpened(f"{result.role} VM {result.name} ({point.id}): {result.reason}")
                vms.append({"name": result.name, "restore_point": point.id, "addresses": result.addresses,
                            "boot_seconds": result.boot_seconds})  # fmt: skip
            prefix = self.network.command_prefix()
            self._wait_for_service(prefix, address, port, protocol)
            door = start_door(prefix, listener, address, port, os.path.join(state.directory, "door.log"))
            time.sleep(0.2)
            if door.poll() is not None:
                raise LabNotOpened(f"the door process ended at once (exit status {door.returncode})")
            host_port = listener.getsockname()[1]
            state.pid, state.pid_start = door.pid, process_start(door.pid)
            state.door = f"127.0.0.1:{host_port} -> {address}:{port}"
            state.status = "open"
            state.save()
        except BaseException:
            state.status = "tearing-down"
            state.save()
            self.say(f"lab {lab_id}: tearing down")
            teardown_lab(state, self.say)
            self.events.record(Component.LAB, Phase.FINISH, Outcome.FAILED, f"lab {lab_id} could not be opened")
            raise
        self.events.record(Component.LAB, "open", Outcome.OK, f"lab {lab_id}: {state.door}")
        return OpenedLab(lab_id, f"127.0.0.1:{host_port}", f"{address}:{port}", vms, time.monotonic() - started)

    def _wait_for_service(self, prefix: list[str], address: str, port: int, protocol: str) -> None:
        until = min(self.deadline, time.monotonic() + SERVICE_WAIT)
        while True:
            probe = run_probe(prefix, "tcp", [address, str(port), "--protocol", protocol], timeout=5)
            if probe.ok:
                return
            if time.monotonic() > until:
                what = "nothing in the lab answers" if protocol == "tcp" else f"no {protocol} server takes clients"
                raise LabNotOpened(f"{what} on {address}:{port}: {probe.detail}")
            time.sleep(1.0)


def open_lab(
    repository: Repository,
    catalog: Catalog,
    config: LabConfig,
    points: list[RestorePoint],
    expose: str,
    port: int = 0,
    *,
    protocol: str = "auto",
    mount_options: MountOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> OpenedLab:
    address, service_port = parse_expose(expose)
    if protocol == "auto":
        protocol = protocol_for_port(service_port)
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"--protocol {protocol!r}: give one of auto, {', '.join(PROTOCOLS)}")
    listener = bind_door(port)  # a port in use is refused before anything boots
    try:
        lab = OpenLab(
            repository,
            catalog,
            with_door_address(config, address),
            points,
            integrity=False,
            mount_options=mount_options,
            log=log,
        )
        return lab.open(address, service_port, listener, protocol)
    finally:
        listener.close()  # the door process has its own copy


def open_labs() -> list[LabState]:
    return [s for s in load_labs() if s.door]


def close_lab(lab_id: str | None, say: Callable[[str], None]) -> LabState:
    """Stop an open lab's door and tear the lab down; the lab closed."""
    if os.geteuid() != 0:
        raise NeedsRoot("closing a lab needs root")
    labs = open_labs()
    if lab_id:
        chosen = [s for s in labs if s.lab_id == lab_id]
        if not chosen:
            raise InvalidArgument(f"no open lab {lab_id!r} (open: {', '.join(s.lab_id for s in labs) or 'none'})")
    else:
        chosen = labs
        if len(chosen) != 1:
            raise InvalidArgument(
                f"{len(chosen)} labs are open ({', '.join(s.lab_id for s in labs) or 'none'}): name the one to close"
            )
    state = chosen[0]
    if state.owner_alive():
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + DOOR_STARTS
        while state.owner_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    state.status = "tearing-down"
    state.save()
    problems = teardown_lab(state, say)
    if problems:
        raise SurepointError(f"lab {state.lab_id}: could not remove everything: {'; '.join(problems)}")
    return state
