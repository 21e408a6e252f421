"""Process liveness from /proc: alive, zombie, and a reused pid told apart by its start time."""

from __future__ import annotations

import os
import subprocess

from surepoint.processes import command_lines, is_zombie, process_alive, process_start, same_process


def test_this_process():
    me = os.getpid()
    assert process_alive(me) and not is_zombie(me)
    start = process_start(me)
    assert start is not None and same_process(me, start)
    assert not same_process(me, start + 1)  # another process that got the same pid
    assert not same_process(None, start)
    assert any(pid == me for pid, _argv in command_lines())


def test_a_zombie_is_not_alive_and_a_reaped_process_is_gone():
    child = subprocess.Popen(["true"])
    start = process_start(child.pid)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert is_zombie(child.pid)
    assert not process_alive(child.pid)
    assert not same_process(child.pid, start)
    child.wait()
    assert process_start(child.pid) is None
    assert not process_alive(child.pid)
