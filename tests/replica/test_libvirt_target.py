"""The libvirt domain of a replica: the source's XML renamed, without identity, disks on the latest point."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from surepoint.replica import images
from surepoint.replica.layout import ReplicaDir, ReplicaPoint, SourceConfig, SourceDisk

SOURCE_XML = """<domain type='kvm' id='7'>
  <name>web01</name>
  <uuid>0f6d1c3e-1111-2222-3333-444455556666</uuid>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/vms/web01.img'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>"""


def test_replica_xml(tmp_path):
    source = SourceConfig(
        argv=[], libvirt_xml=SOURCE_XML, disks=[SourceDisk("virtio-disk0", 1 << 20, "/srv/vms/web01.img")]
    )
    replica = ReplicaDir.create(str(tmp_path / "web01-replica"), "web01", source)
    with replica:
        images.create(str(tmp_path / "web01-replica/disks/virtio-disk0.base.qcow2"), 1 << 20)
        replica.add_point(
            ReplicaPoint(
                "p1", "2026-11-30T10:00:00.000000Z", "crash", {"virtio-disk0": "disks/virtio-disk0.base.qcow2"}
            )
        )
    from surepoint.replica.libvirt_target import replica_xml

    root = ET.fromstring(replica_xml(replica, SOURCE_XML))
    assert root.findtext("name") == "web01-replica"
    assert root.find("uuid") is None and "id" not in root.attrib
    disk, cdrom = root.findall("./devices/disk")
    assert disk.find("source").get("file") == str(tmp_path / "web01-replica/disks/virtio-disk0.base.qcow2")
    assert disk.find("driver").get("type") == "qcow2" and disk.find("backingStore") is None
    assert cdrom.find("source").get("file") == "/srv/iso/install.iso"  # not a replicated disk: left as it was
