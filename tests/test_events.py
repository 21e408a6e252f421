"""The typed event recorder: what lands in the catalog, and what is echoed to the user."""

from __future__ import annotations

from pathlib import Path

from surepoint.catalog import Catalog
from surepoint.events import Component, EventRecorder, Outcome, Phase


def test_recorder_binds_point_and_source_and_echoes_only_what_is_not_ok(tmp_path: Path):
    catalog = Catalog(str(tmp_path / "catalog.sqlite"))
    said: list[str] = []
    recorder = EventRecorder(catalog, "repo1", echo=said.append)
    job = recorder.bound(restore_point="rp1", source="db01")
    job.record(Component.JOB, Phase.START, Outcome.OK, "backup of db01")
    job("postgresql", "freeze", "failed", "timeout")  # a writer's event sink call
    recorder.record(Component.GC, Phase.SWEEP, message="removed 0 chunks")
    rows = [(e.restore_point, e.source, e.component, e.phase, e.outcome, e.message) for e in catalog.events("repo1")]
    assert rows == [
        ("rp1", "db01", "job", "start", "ok", "backup of db01"),
        ("rp1", "db01", "postgresql", "freeze", "failed", "timeout"),
        (None, None, "gc", "sweep", "ok", "removed 0 chunks"),
    ]
    assert said == ["postgresql freeze: failed timeout"]
    assert catalog.events("repo2") == []


def test_a_recorder_without_store_only_echoes():
    said: list[str] = []
    EventRecorder(None, "r", echo=said.append).record(Component.LAB, Phase.BOOT, Outcome.WARNING, "slow")
    assert said == ["lab boot: warning slow"]
