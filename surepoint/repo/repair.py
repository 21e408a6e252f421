"""Self-healing after verification: quarantine damaged chunks, bring them back from a copy, report.

`repair(...)` takes what `verify` found. Every damaged chunk is moved out of chunks/ to
quarantine/<id> (a missing one has nothing to move), so deduplication never trusts it again: the
next backup of a source that still holds those bytes finds no chunk of that id and stores it again,
which heals every restore point that refers to it (chunk ids are content addresses). With a second
repository (`other`, typically a copy made by `surepoint copy`, or the repository this one was
copied from), each damaged chunk is looked for there: the points that use it, same restore-point id
(a copy keeps ids) or else the same name, give the chunk at the same place of the same disk; its
plaintext is checked by the other repository's keys, then against this repository's chunk id (keyed
BLAKE3: equal only for the very bytes that were lost) and written back. Nothing that fails either
check is ever written.

The outcome per chunk is `healed` (written back), `quarantined` (waits for the next backup of its
source) or, when a second repository was searched and did not have it, `lost`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from surepoint.errors import DamagedData, SurepointError
from surepoint.repo.chunks import ZERO_ID, chunk_id_from_name, chunk_object_name
from surepoint.repo.extents import Extent, merge
from surepoint.repo.fixed_index import FixedIndex
from surepoint.repo.locks import repository_lock
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository
from surepoint.repo.verify import DamagedRange, VerifyReport, plan_chunks
from surepoint.storage.backend import ObjectNotFound

QUARANTINE_PREFIX = "quarantine/"
MAX_NAMESAKES = 20  # other restore points of the same name tried per use of a chunk


@dataclass
class RepairedPoint:
    id: str
    name: str
    state: str  # healed | damaged | verified (nothing was wrong)
    damaged: list[DamagedRange] = field(default_factory=list)  # still damaged: quarantined, or an unreadable index
    lost: list[DamagedRange] = field(default_factory=list)  # searched in the second repository too: not there


@dataclass
class RepairReport:
    points: list[RepairedPoint]
    healed_chunks: int = 0
    quarantined_chunks: int = 0
    lost_chunks: int = 0
    damaged_manifests: list[str] = field(default_factory=list)
    other: str | None = None  # where damaged chunks were looked for

    @property
    def whole(self) -> bool:
        return not self.damaged_manifests and all(p.state != "damaged" for p in self.points)

    def to_dict(self) -> dict:
        return asdict(self)


def repair(
    repository: Repository,
    points: Sequence[RestorePoint],
    found: VerifyReport,
    *,
    other: Repository | None = None,
    log: Callable[[str], None] | None = None,
) -> RepairReport:
    say = log or (lambda _m: None)
    uses, index_damage = plan_chunks(repository, points)
    _drop_stored_again(repository)
    bad = [c for c in found.bad_chunks if c in uses]
    healed: set[bytes] = set()
    finder = _Finder(repository, other) if other is not None else None
    # Chunks are written as a backup writes them (its lock keeps gc from taking them meanwhile).
    with repository_lock(repository.backend, "backup"):
        for chunk_id in bad:
            _quarantine(repository, chunk_id)
            if finder is None:
                continue
            data = finder.find(chunk_id, uses[chunk_id])
            if data is None:
                continue
            repository.chunks.put(chunk_id, data, durable=False)
            healed.add(chunk_id)
        repository.backend.sync()
    for chunk_id in list(healed):  # read back through the normal path: only what checks out counts
        try:
            repository.chunks.get(chunk_id)
        except DamagedData:
            healed.discard(chunk_id)
            continue
        with contextlib.suppress(ObjectNotFound):
            repository.backend.delete(QUARANTINE_PREFIX + chunk_id.hex())
    unhealed = [c for c in bad if c not in healed]
    outcome = "lost" if other is not None else "quarantined"
    for chunk_id in unhealed:
        say(f"chunk {chunk_id.hex()[:16]}: {outcome}")

    by_point: dict[str, dict[tuple[int, str], list[Extent]]] = defaultdict(lambda: defaultdict(list))
    sizes = {(p.id, d.number): (d.chunk_size, d.size) for p in points for d in p.disks}
    for chunk_id in unhealed:
        for point_id, disk, number in uses[chunk_id]:
            chunk_size, size = sizes[(point_id, disk)]
            offset = number * chunk_size
            by_point[point_id][(disk, outcome)].append(Extent(offset, min(chunk_size, size - offset)))
    was_damaged = {p.id for p in found.points if p.state == "damaged"}
    results = []
    for point in points:
        result = RepairedPoint(point.id, point.name, "verified")
        for (disk, kind), extents in sorted(by_point.get(point.id, {}).items()):
            reason = (
                f"not in {other.backend.location} either"
                if kind == "lost"
                else "quarantined: the next backup of its source stores it again if the source still holds these bytes"
            )
            ranges = [DamagedRange(disk, e.offset, e.length, reason) for e in merge(extents)]
            (result.lost if kind == "lost" else result.damaged).extend(ranges)
        result.damaged.extend(index_damage.get(point.id, []))
        if result.damaged or result.lost:
            result.state = "damaged"
        elif point.id in was_damaged:
            result.state = "healed"
        results.append(result)
    return RepairReport(
        results,
        healed_chunks=len(healed),
        quarantined_chunks=len(unhealed) if other is None else 0,
        lost_chunks=len(unhealed) if other is not None else 0,
        damaged_manifests=list(found.damaged_manifests),
        other=other.backend.location if other is not None else None,
    )


def _drop_stored_again(repository: Repository) -> None:
    """Quarantined chunks that a later backup (or repair) stored again intact: the bad copy goes."""
    for info in list(repository.backend.list(QUARANTINE_PREFIX)):
        chunk_id = chunk_id_from_name(info.name)
        if chunk_id is None:
            continue
        try:
            repository.chunks.get(chunk_id)
        except DamagedData:
            continue
        with contextlib.suppress(ObjectNotFound):
            repository.backend.delete(info.name)


def _quarantine(repository: Repository, chunk_id: bytes) -> None:
    """Move a damaged chunk aside (kept for a look, never read or deduplicated against again)."""
    try:
        repository.backend.rename(chunk_object_name(chunk_id), QUARANTINE_PREFIX + chunk_id.hex())
    except ObjectNotFound:
        pass  # missing: nothing to move


class _Finder:
    """Looks for the plaintext of a chunk in a second repository, by where this repository uses it."""

    def __init__(self, repository: Repository, other: Repository) -> None:
        self.repository = repository
        self.other = other
        points = other.list_restore_points()
        self.by_id = {p.id: p for p in points}
        self.by_name: dict[str, list[RestorePoint]] = defaultdict(list)
        for p in reversed(points):  # newest first
            self.by_name[p.name].append(p)
        self.names = {p.id: p.name for p in repository.list_restore_points()}
        self._indexes: dict[tuple[str, int], FixedIndex | None] = {}

    def _index(self, point: RestorePoint, disk: int) -> FixedIndex | None:
        key = (point.id, disk)
        if key not in self._indexes:
            try:
                self._indexes[key] = self.other.load_index(point, disk)
            except SurepointError:
                self._indexes[key] = None
        return self._indexes[key]

    def find(self, chunk_id: bytes, uses: list[tuple[str, int, int]]) -> bytes | None:
        tried: set[bytes] = set()
        for point_id, disk, number in uses:
            candidates = [self.by_id[point_id]] if point_id in self.by_id else []
            candidates += [p for p in self.by_name.get(self.names.get(point_id, ""), [])[:MAX_NAMESAKES]]
            for candidate in candidates:
                index = self._index(candidate, disk)
                if index is None or number >= len(index.ids):
                    continue
                other_id = index.ids[number]
                if other_id == ZERO_ID or other_id in tried:
                    continue
                tried.add(other_id)
                try:
                    data = self.other.chunks.get(other_id)  # checked with the other repository's keys
                except SurepointError:
                    continue
                if self.repository.chunks.chunk_id(data) == chunk_id:  # exactly the bytes that were lost
                    return data
        return None
