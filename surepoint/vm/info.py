"""How to reach a VM: its QMP monitor, its guest agent, its process (or its libvirt domain)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VmInfo:
    name: str
    qmp: str
    guest_agent: str | None = None
    pid: int | None = None
    command_line: list[str] = field(default_factory=list)
    libvirt_uri: str | None = None  # set for a libvirt domain: QMP and agent go through libvirtd
    domain_xml: str | None = None  # a libvirt domain's XML (its configuration)
