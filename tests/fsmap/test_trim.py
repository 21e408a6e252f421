"""guest-fstrim before a VM backup: asked only where QEMU passes discards to the image."""

from __future__ import annotations

import pytest

from surepoint.errors import ConfigError
from surepoint.fsmap.trim import discard_enabled, trim_guest
from surepoint.jobs.job_file import parse_job


class Agent:
    """Answers guest-fstrim the way qemu-guest-agent 7.2 does."""

    def __init__(self, reply: dict | Exception) -> None:
        self.reply = reply
        self.calls: list[str] = []

    def execute(self, command: str, args=None, timeout=None):
        self.calls.append(command)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def test_discard_is_read_from_the_command_line_or_the_domain_xml():
    assert discard_enabled(["-drive", "file=a.qcow2,if=virtio,discard=unmap"], None)
    assert discard_enabled(["-blockdev", '{"driver":"qcow2","discard":"unmap","file":{}}'], None)
    assert not discard_enabled(["-blockdev", "driver=qcow2,node-name=root,file.filename=a"], None)
    assert not discard_enabled(["-drive", "file=a,discard=ignore"], None)
    assert discard_enabled([], "<disk><driver name='qemu' type='qcow2' discard='unmap'/></disk>")
    assert not discard_enabled([], "<disk><driver name='qemu' type='qcow2'/></disk>")


def test_trim_reports_what_the_guest_released():
    agent = Agent({"paths": [{"path": "/", "trimmed": 300 << 20, "minimum": 0}, {"path": "/data", "trimmed": 0}]})
    ok, message = trim_guest(agent, ["-drive", "file=x,discard=unmap"], None)
    assert ok and agent.calls == ["guest-fstrim"]
    assert "2 filesystems trimmed, 300 MiB released" in message
    failing = Agent({"paths": [{"path": "/boot\x1b[2J", "error": "the operation is not supported"}]})
    ok, message = trim_guest(failing, ["discard=unmap"], None)
    assert not ok and "/boot\\e[2J (the operation is not supported)" in message


def test_no_trim_without_discard_or_agent():
    agent = Agent({"paths": []})
    ok, message = trim_guest(agent, ["-blockdev", "driver=qcow2"], None)
    assert ok and agent.calls == [] and "no disk of the VM has discard=unmap" in message
    ok, message = trim_guest(None, ["discard=unmap"], None)
    assert not ok and "no usable guest agent" in message
    ok, message = trim_guest(Agent(TimeoutError("no answer")), ["discard=unmap"], None)
    assert not ok and "guest-fstrim failed: no answer" in message


def test_job_file_setting():
    assert parse_job({"vm": "db01", "fstrim": True}).fstrim
    assert not parse_job({"vm": "db01"}).fstrim
    with pytest.raises(ConfigError, match="fstrim"):
        parse_job({"sources": ["/srv/a.img"], "fstrim": True})
    with pytest.raises(ConfigError, match="fstrim"):
        parse_job({"vm": "db01", "fstrim": "yes"})
