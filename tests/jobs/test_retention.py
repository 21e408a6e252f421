"""Retention planning (a pure function over restore points) and forgetting by policy in process."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from surepoint.jobs.file_backup import backup_files
from surepoint.jobs.retention import forget_by_policy, plan_retention
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.retention import Policy
from surepoint.timestamps import format_utc
from tests.conftest import make_image

START = datetime(2026, 1, 1, tzinfo=UTC)


def point(i: int, name: str, hours: float) -> RestorePoint:
    return RestorePoint(f"p{i:04d}", name, format_utc(START + timedelta(hours=hours)), {}, [])


def test_each_name_is_judged_on_its_own():
    points = [point(i, "db" if i % 2 else "web", i) for i in range(8)]
    decisions = plan_retention(points, Policy(last=2))
    assert [d.name for d in decisions] == ["db"] * 4 + ["web"] * 4  # names in order, then as given
    kept = {d.id for d in decisions if d.keep}
    assert kept == {"p0005", "p0007", "p0004", "p0006"}  # the two newest of each name
    assert all(d.reasons == ["last"] for d in decisions if d.keep)
    assert all(d.reasons == [] for d in decisions if not d.keep)


def test_daily_keeps_the_newest_of_each_day():
    points = [point(i, "db", h) for i, h in enumerate([1, 5, 23, 25, 30, 49])]
    decisions = {d.id: d for d in plan_retention(points, Policy(daily=2))}
    assert [i for i, d in decisions.items() if d.keep] == ["p0004", "p0005"]  # days 2 and 3


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 24 * 400)), min_size=1, max_size=40),
    st.integers(1, 5),
    st.integers(0, 5),
    st.integers(0, 5),
)
def test_the_newest_point_of_every_name_survives_any_policy(entries, last, daily, monthly):
    points = [point(i, name, hours) for i, (name, hours) in enumerate(entries)]
    decisions = plan_retention(points, Policy(last=last, daily=daily, monthly=monthly))
    assert sorted(d.id for d in decisions) == sorted(p.id for p in points)  # one decision per point
    for name in {p.name for p in points}:
        newest = max((p for p in points if p.name == name), key=lambda p: (p.created, p.id))
        assert next(d for d in decisions if d.id == newest.id).keep
    for name in {p.name for p in points}:
        assert sum(d.keep for d in decisions if d.name == name) <= last + daily + monthly


def test_forget_by_policy_deletes_what_the_plan_forgets(repo, catalog, events, tmp_path: Path):
    image = make_image(tmp_path / "disk.img", 256 << 10, seed=2, regions=1, region_size=64 << 10)
    made = [backup_files(repo, events, [str(image)], name="vm1") for _ in range(3)]

    dry = forget_by_policy(repo, events, Policy(last=1), dry_run=True)
    assert [d.id for d in dry.forgotten] == [made[0].id, made[1].id]
    assert len(repo.list_restore_points()) == 3  # a dry run forgets nothing

    result = forget_by_policy(repo, events, Policy(last=1))
    assert [d.id for d in result.forgotten] == [made[0].id, made[1].id]
    assert [p.id for p in repo.list_restore_points()] == [made[2].id]
    forgotten = [e.restore_point for e in catalog.events(repo.id) if e.phase == "forget"]
    assert forgotten == [made[0].id, made[1].id]
    assert result.to_json()["decisions"][2] == {
        "id": made[2].id,
        "name": "vm1",
        "created": made[2].created,
        "keep": True,
        "reasons": ["last"],
    }
