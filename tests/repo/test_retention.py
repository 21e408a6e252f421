from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from surepoint.repo.retention import Candidate, Policy, apply_policy

START = datetime(2026, 1, 1, tzinfo=UTC)


def points(hours: list[int]) -> list[Candidate]:
    return [Candidate(f"p{i:04d}", START + timedelta(hours=h)) for i, h in enumerate(sorted(set(hours)))]


def test_keep_last_keeps_the_newest():
    cands = points(list(range(10)))
    kept = apply_policy(cands, Policy(last=3))
    assert set(kept) == {"p0007", "p0008", "p0009"}


def test_daily_keeps_newest_of_each_day():
    # two points a day for five days
    cands = points([d * 24 + h for d in range(5) for h in (1, 20)])
    kept = apply_policy(cands, Policy(daily=3))
    days = sorted((c.time.date(), c.id) for c in cands if c.id in kept)
    assert len(days) == 3
    for day, cid in days:
        same_day = [c for c in cands if c.time.date() == day]
        assert cid == max(same_day, key=lambda c: c.time).id


def test_gfs_reasons_are_reported():
    cands = points([0, 24 * 40, 24 * 400])
    kept = apply_policy(cands, Policy(last=1, monthly=2, yearly=2))
    newest = max(cands, key=lambda c: c.time).id
    assert "last" in kept[newest] and "monthly" in kept[newest] and "yearly" in kept[newest]


def test_empty_policy_keeps_everything():
    cands = points([1, 2, 3])
    assert set(apply_policy(cands, Policy())) == {c.id for c in cands}


policies = st.builds(
    Policy,
    last=st.integers(0, 5),
    hourly=st.integers(0, 5),
    daily=st.integers(0, 5),
    weekly=st.integers(0, 5),
    monthly=st.integers(0, 5),
    yearly=st.integers(0, 3),
)


@given(st.lists(st.integers(0, 24 * 800), min_size=1, max_size=60), policies)
def test_policy_properties(hours, policy):
    cands = points(hours)
    kept = apply_policy(cands, policy)
    ids = {c.id for c in cands}
    assert set(kept) <= ids
    newest = max(cands, key=lambda c: c.time).id
    if policy.is_empty():
        assert set(kept) == ids
    else:
        # the newest point is always kept by any non-empty rule
        assert newest in kept
        # never more points kept than the rules allow
        assert len(kept) <= policy.last + policy.hourly + policy.daily + policy.weekly + policy.monthly + policy.yearly
    # deterministic and independent of input order
    assert apply_policy(list(reversed(cands)), policy) == kept


@given(st.lists(st.integers(0, 24 * 100), min_size=1, max_size=40), st.integers(1, 10))
def test_more_generous_policy_keeps_a_superset(hours, n):
    cands = points(hours)
    small = apply_policy(cands, Policy(last=n, daily=n))
    big = apply_policy(cands, Policy(last=n + 1, daily=n + 1))
    assert set(small) <= set(big)
