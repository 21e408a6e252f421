"""The replica of a libvirt domain, defined (powered off) in the libvirt of the replica's host when
there is one: the source's XML under the replica's name, its disks pointing at the latest point."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from surepoint.replica.layout import ReplicaDir
from surepoint.vm.libvirt_domain import LibvirtError, connect


def replica_xml(replica: ReplicaDir, domain_xml: str) -> str:
    """The source's domain XML with the replica's name, no UUID, no live state, disks on the latest point."""
    root = ET.fromstring(domain_xml)
    name = root.find("name")
    if name is not None:
        name.text = os.path.basename(replica.path)
    for tag in ("uuid",):
        for el in root.findall(tag):
            root.remove(el)
    root.attrib.pop("id", None)
    latest = replica.point("latest")
    by_filename = {d.filename: d.device for d in replica.source.disks if d.filename}
    for disk in root.iterfind("./devices/disk"):
        source = disk.find("source")
        if source is None or source.get("file") not in by_filename:
            continue
        device = by_filename[source.get("file")]
        if device in latest.files:
            source.set("file", replica.chain_files(latest, device))
            driver = disk.find("driver")
            if driver is not None:
                driver.set("type", "qcow2")
            for backing in disk.findall("backingStore"):
                disk.remove(backing)
    return ET.tostring(root, encoding="unicode")


def define(replica: ReplicaDir) -> str:
    """Define (or redefine) the replica's domain, powered off; a note saying what happened."""
    if not replica.source.libvirt_xml:
        return "no libvirt domain to define"
    try:
        conn = connect()
    except LibvirtError as exc:
        return f"replica domain not defined ({exc})"
    try:
        conn.defineXML(replica_xml(replica, replica.source.libvirt_xml))
    except Exception as exc:  # libvirt.libvirtError, whose module may be absent here
        return f"replica domain not defined: {exc}"
    finally:
        conn.close()
    return f"libvirt domain {os.path.basename(replica.path)} defined (powered off)"
