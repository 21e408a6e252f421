"""jobs.vm_fleet without VMs: one VM that cannot be found fails alone, in the order asked, never raising."""

from __future__ import annotations

import pytest

from surepoint.jobs.vm_backup import VmJobOptions
from surepoint.jobs.vm_fleet import backup_vms


@pytest.mark.parametrize("parallel", [1, 3])
def test_unknown_vms_fail_one_by_one(repo, catalog, monkeypatch, parallel: int):
    monkeypatch.setenv("SUREPOINT_LIBVIRT_URI", "none")  # no libvirt look-up: only QEMU processes
    names = ["no-such-vm-1", "no-such-vm-2", "no-such-vm-3"]
    outcomes = backup_vms(repo, catalog, names, VmJobOptions(), parallel=parallel)
    assert [o.vm for o in outcomes] == names
    for o in outcomes:
        assert o.status == "failed" and o.result is None and o.vm in o.error
        assert o.to_json() == {"vm": o.vm, "status": "failed", "error": o.error}
    assert repo.list_restore_points() == []
