"""The pure parts of a copy job: which restore points to copy, and the bandwidth throttle."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from surepoint.jobs.copy import COPY_METADATA, Throttle, plan_copy
from surepoint.repo.manifest import RestorePoint

SOURCE = "s" * 32


def point(pid: str, name: str, day: int, copied_from: str | None = None) -> RestorePoint:
    metadata = {COPY_METADATA: {"repository": copied_from, "copied": "x"}} if copied_from else {}
    return RestorePoint(pid, name, f"2026-11-{day:02d}T00:00:00.000000Z", {}, [], metadata=metadata)


def test_plan_copies_what_the_target_lacks_oldest_first():
    source = [point("c", "web", 3), point("a", "web", 1), point("b", "db", 2)]
    wanted, skipped, present = plan_copy(source, [], SOURCE)
    assert [p.id for p in wanted] == ["a", "b", "c"] and skipped == [] and present == 0
    wanted, _, present = plan_copy(source, [point("a", "web", 1, SOURCE)], SOURCE)
    assert [p.id for p in wanted] == ["b", "c"] and present == 1


def test_plan_filters_by_name_and_date():
    source = [point("a", "web", 1), point("b", "db", 2), point("c", "web", 3)]
    assert [p.id for p in plan_copy(source, [], SOURCE, names=["web"])[0]] == ["a", "c"]
    assert [p.id for p in plan_copy(source, [], SOURCE, since="2026-11-02T00:00:00.000000Z")[0]] == ["b", "c"]


def test_plan_does_not_bring_back_what_the_target_forgot():
    source = [point("a", "web", 1), point("b", "web", 2), point("c", "web", 3), point("d", "db", 1)]
    target = [point("b", "web", 2, SOURCE)]  # "a" was forgotten there by its own retention
    wanted, skipped, _ = plan_copy(source, target, SOURCE)
    assert [p.id for p in wanted] == ["d", "c"]
    assert [(s.id, s.reason) for s in skipped] == [("a", "older than the newest copy of its name on the target")]
    # Points that came from another repository do not count.
    wanted, skipped, _ = plan_copy(source, [point("x", "web", 9, "other")], SOURCE)
    assert len(wanted) == 4 and skipped == []


def test_throttle_holds_the_rate():
    throttle = Throttle(4 << 20)  # 4 MiB/s
    started = time.monotonic()
    for _ in range(9):
        throttle.take(256 << 10)  # 2.25 MiB: the first is free, the other 2 MiB take at least 0.5 s
    assert time.monotonic() - started >= 0.5
    unlimited = Throttle(None)
    started = time.monotonic()
    unlimited.take(1 << 40)
    assert time.monotonic() - started < 0.5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 28)), max_size=12),
    st.sets(st.integers(0, 11)),
    st.sets(st.sampled_from("abc")),
)
def test_plan_properties(specs, on_target, names):
    source = [point(f"p{i:02d}", name, day) for i, (name, day) in enumerate(specs)]
    target = [point(p.id, p.name, int(p.created[8:10]), SOURCE) for i, p in enumerate(source) if i in on_target]
    wanted, skipped, present = plan_copy(source, target, SOURCE, names=sorted(names))
    target_ids = {p.id for p in target}
    considered = [p for p in source if not names or p.name in names]
    # Every considered point is accounted for exactly once; nothing on the target is copied again.
    assert len(wanted) + len(skipped) + present == len(considered)
    assert not {p.id for p in wanted} & target_ids
    assert [(p.created, p.id) for p in wanted] == sorted((p.created, p.id) for p in wanted)
    # Nothing older than a copy of its name already on the target is planned.
    for p in wanted:
        assert all(t.created <= p.created for t in target if t.name == p.name)
