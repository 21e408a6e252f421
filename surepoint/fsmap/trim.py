"""Asking a running guest to trim its filesystems before a backup (qemu-guest-agent `guest-fstrim`).

A trim tells the disk which blocks the guest's filesystems no longer use. Where QEMU passes
discards to the image (`discard=unmap` on the drive, `<driver discard='unmap'/>` in libvirt), the
image drops those blocks, so a backup does not read them: that helps with filesystems whose free
space surepoint cannot map itself (Btrfs, NTFS...) and with `--no-skip-free`. Without discard on
the host side, a trim frees nothing in the image, so it is not asked for. QEMU 7.2's QMP does not
report the discard setting, so it is read from the VM's command line or libvirt XML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from surepoint.text import printable

TRIM_TIMEOUT = 600.0
_DISCARD = re.compile(r"""discard(=|"\s*:\s*"|'\s*:\s*')(unmap|on)\b""")
_XML_DISCARD = re.compile(r"""<driver\b[^>]*\bdiscard\s*=\s*["']unmap["']""")


def discard_enabled(command_line: Sequence[str], domain_xml: str | None) -> bool:
    """Whether a disk of the VM passes the guest's discards to its image."""
    if domain_xml and _XML_DISCARD.search(domain_xml):
        return True
    return any(_DISCARD.search(arg) for arg in command_line)


def trim_guest(agent: Any, command_line: Sequence[str], domain_xml: str | None) -> tuple[bool, str]:
    """Ask the guest to trim every mounted filesystem; (worked, what to tell the user)."""
    if agent is None:
        return False, "fstrim asked for, but the VM has no usable guest agent: not trimmed"
    if not discard_enabled(command_line, domain_xml):
        return True, "fstrim skipped: no disk of the VM has discard=unmap, a trim would free nothing in the images"
    try:
        reply = agent.execute("guest-fstrim", {}, timeout=TRIM_TIMEOUT) or {}
    except Exception as exc:  # noqa: BLE001 - a failed trim only costs reading what it would have freed
        return False, f"guest-fstrim failed: {printable(str(exc))}"
    paths = reply.get("paths", []) if isinstance(reply, dict) else []
    trimmed = sum(p.get("trimmed", 0) for p in paths if isinstance(p, dict) and isinstance(p.get("trimmed"), int))
    failed = [p for p in paths if isinstance(p, dict) and p.get("error")]
    message = f"guest-fstrim: {len(paths) - len(failed)} filesystems trimmed, {trimmed / (1 << 20):.0f} MiB released"
    if failed:
        message += "; not trimmed: " + ", ".join(
            f"{printable(str(p.get('path')))} ({printable(str(p.get('error')))})" for p in failed[:5]
        )
    return not failed, message
