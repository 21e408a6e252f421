"""Free blocks of an XFS filesystem, from each allocation group's by-block-number free-space B+tree.

Every AGF and btree block must carry the right magic, position, owner and (on v5 filesystems)
CRC32C; the free extents found must add up to the AGF's free count. The log must not hold
changes that are not yet written back (a filesystem snapshotted while mounted and not frozen):
recovery would replay allocations the btrees do not show yet. A cleanly unmounted log is
recognised by its unmount record; a frozen filesystem's log, which XFS "covers" with dummy
superblock updates, by the fact that nothing but the superblock is left to replay.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from surepoint.fsmap.checksums import crc32c
from surepoint.fsmap.volume import Inconsistent, NotUnderstood, ReadFn, bounded_read
from surepoint.repo.extents import Extent, merge

SB_MAGIC = b"XFSB"
AGF_MAGIC = b"XAGF"
BNOBT_MAGIC_V4 = b"ABTB"
BNOBT_MAGIC_V5 = b"AB3B"
AGFL_MAGIC = b"XAFL"
AGFL_CRC_OFFSET = 32
SB_CRC_OFFSET = 224
AGF_CRC_OFFSET = 216
BTREE_CRC_OFFSET = 52
INCOMPAT_META_UUID = 0x4
INCOMPAT_NEEDSREPAIR = 0x10
# ftype, sparse inodes, meta_uuid, bigtime, needsrepair (refused below), nrext64, exchange-range,
# parent pointers: none changes how free space is recorded.
INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80
BB = 512
LOG_HEADER_MAGIC = 0xFEEDBABE
LOG_CYCLE_DATA_BLOCKS = 64  # a record header stamps back the first word of this many blocks
OP_START, OP_CONTINUE, OP_WAS_CONTINUED, OP_UNMOUNT = 0x01, 0x04, 0x08, 0x20
TRANS_MAGIC = 0x5452414E  # "TRAN"
LI_BUF = 0x123C
MAX_REPLAY_RECORDS = 64


def probe(read: ReadFn, size: int) -> bool:
    return size >= BB and read(0, 4) == SB_MAGIC


@dataclass
class _Super:
    block_size: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    sector_size: int
    logstart: int
    logblocks: int
    v5: bool
    uuid: bytes


def free_extents(read: ReadFn, size: int) -> list[Extent]:
    """Free byte ranges of the XFS filesystem at offset 0 of `read`, whose volume is `size` bytes."""
    read = bounded_read(read, size)
    sb = _superblock(read(0, BB), read, size)
    _check_log(read, sb)
    free: list[Extent] = []
    for agno in range(sb.agcount):
        free.extend(_ag_free(read, sb, agno))
    return merge(free)


def _superblock(first: bytes, read: ReadFn, size: int) -> _Super:
    (block_size, dblocks) = struct.unpack_from(">IQ", first, 4)
    uuid = first[32:48]
    (logstart,) = struct.unpack_from(">Q", first, 48)
    agblocks, agcount, _rbm, logblocks, version, sector_size = struct.unpack_from(">IIIIHH", first, 84)
    agblklog = first[124]
    inprogress = first[126]
    v5 = version & 0xF == 5
    if version & 0xF not in (4, 5):
        raise NotUnderstood(f"XFS superblock version {version & 0xF} is not supported")
    if sector_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768) or block_size not in (
        512,
        1024,
        2048,
        4096,
        8192,
        16384,
        32768,
        65536,
    ):
        raise Inconsistent(f"implausible XFS sector/block size {sector_size}/{block_size}")
    sector = read(0, sector_size)
    if v5:
        stored = struct.unpack_from("<I", sector, SB_CRC_OFFSET)[0]
        if _crc(sector, SB_CRC_OFFSET) != stored:
            raise Inconsistent("XFS superblock CRC does not match")
        incompat = struct.unpack_from(">I", sector, 216)[0]
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            raise NotUnderstood(f"unknown XFS incompatible features 0x{unknown:x}")
        if incompat & INCOMPAT_NEEDSREPAIR:
            raise Inconsistent("the filesystem is marked as needing repair")
        if incompat & INCOMPAT_META_UUID:
            uuid = sector[248:264]
    if inprogress:
        raise Inconsistent("mkfs did not finish on this filesystem")
    if not agblocks or not agcount or agblocks > 1 << agblklog or (agcount - 1) * agblocks >= dblocks:
        raise Inconsistent("implausible XFS allocation group geometry")
    if dblocks * block_size > size:
        raise Inconsistent("the filesystem is larger than its volume")
    return _Super(block_size, dblocks, agblocks, agcount, agblklog, sector_size, logstart, logblocks, v5, uuid)


def _crc(block: bytes, offset: int) -> int:
    return crc32c(block[:offset] + b"\0\0\0\0" + block[offset + 4 :])


def _ag_free(read: ReadFn, sb: _Super, agno: int) -> list[Extent]:
    ag_start = agno * sb.agblocks * sb.block_size
    agf = read(ag_start + sb.sector_size, sb.sector_size)
    magic, version, seqno, length, bno_root, _cnt_root, _rmap_root, bno_level = struct.unpack_from(">4sIIIIIII", agf)
    freeblks = struct.unpack_from(">I", agf, 52)[0]
    if magic != AGF_MAGIC or version != 1 or seqno != agno:
        raise Inconsistent(f"AG {agno}: bad AGF header")
    expected_length = min(sb.agblocks, sb.dblocks - agno * sb.agblocks)
    if length != expected_length:
        raise Inconsistent(f"AG {agno}: AGF length {length}, the superblock implies {expected_length}")
    if sb.v5:
        if agf[64:80] != sb.uuid:
            raise Inconsistent(f"AG {agno}: AGF belongs to another filesystem")
        if _crc(agf, AGF_CRC_OFFSET) != struct.unpack_from("<I", agf, AGF_CRC_OFFSET)[0]:
            raise Inconsistent(f"AG {agno}: AGF CRC does not match")
    if not 1 <= bno_level <= 16 or not 0 < bno_root < length:
        raise Inconsistent(f"AG {agno}: bad free-space btree root")
    records: list[tuple[int, int]] = []
    _walk(read, sb, agno, bno_root, bno_level - 1, records, [0])
    total = 0
    last_end = 0
    for start, count in records:
        if start < last_end or start + count > length or count == 0:
            raise Inconsistent(f"AG {agno}: free extent {start}+{count} overlaps or leaves the group")
        last_end = start + count
        total += count
    if total != freeblks:
        raise Inconsistent(f"AG {agno}: free-space btree holds {total} blocks, the AGF says {freeblks}")
    records.extend((b, 1) for b in _free_list(read, sb, agno, agf, length))
    return [Extent(ag_start + start * sb.block_size, count * sb.block_size) for start, count in sorted(records)]


def _free_list(read: ReadFn, sb: _Super, agno: int, agf: bytes, length: int) -> list[int]:
    """Blocks on the AG free list: reserved for btree growth, holding no file data."""
    first, last, count = struct.unpack_from(">III", agf, 40)
    if count == 0:
        return []
    agfl = read(agno * sb.agblocks * sb.block_size + 3 * sb.sector_size, sb.sector_size)
    hdr = 36 if sb.v5 else 0
    if sb.v5:
        if agfl[:4] != AGFL_MAGIC or struct.unpack_from(">I", agfl, 4)[0] != agno or agfl[8:24] != sb.uuid:
            raise Inconsistent(f"AG {agno}: bad AGFL header")
        if _crc(agfl, AGFL_CRC_OFFSET) != struct.unpack_from("<I", agfl, AGFL_CRC_OFFSET)[0]:
            raise Inconsistent(f"AG {agno}: AGFL CRC does not match")
    slots = (sb.sector_size - hdr) // 4
    if first >= slots or last >= slots or count > slots or (last - first) % slots + 1 != count:
        raise Inconsistent(f"AG {agno}: bad free list bounds")
    blocks = [struct.unpack_from(">I", agfl, hdr + 4 * ((first + i) % slots))[0] for i in range(count)]
    if any(not 0 < b < length for b in blocks):
        raise Inconsistent(f"AG {agno}: free list block outside the group")
    return blocks


def _walk(
    read: ReadFn, sb: _Super, agno: int, agbno: int, level: int, out: list[tuple[int, int]], visited: list[int]
) -> None:
    visited[0] += 1
    if visited[0] > sb.agblocks:
        raise Inconsistent(f"AG {agno}: free-space btree loops")
    bs = sb.block_size
    block = read((agno * sb.agblocks + agbno) * bs, bs)
    magic, blevel, numrecs = struct.unpack_from(">4sHH", block)
    hdr = 56 if sb.v5 else 16
    if magic != (BNOBT_MAGIC_V5 if sb.v5 else BNOBT_MAGIC_V4) or blevel != level:
        raise Inconsistent(f"AG {agno}: block {agbno} is not a free-space btree block of level {level}")
    if sb.v5:
        blkno, _lsn = struct.unpack_from(">QQ", block, 16)
        owner = struct.unpack_from(">I", block, 48)[0]
        if blkno != (agno * sb.agblocks + agbno) * (bs // BB) or block[32:48] != sb.uuid or owner != agno:
            raise Inconsistent(f"AG {agno}: free-space btree block {agbno} is misplaced")
        if _crc(block, BTREE_CRC_OFFSET) != struct.unpack_from("<I", block, BTREE_CRC_OFFSET)[0]:
            raise Inconsistent(f"AG {agno}: free-space btree block {agbno} CRC does not match")
    if level == 0:
        if numrecs > (bs - hdr) // 8:
            raise Inconsistent(f"AG {agno}: too many records in btree block {agbno}")
        out.extend(struct.iter_unpack(">II", block[hdr : hdr + numrecs * 8]))
        return
    maxrecs = (bs - hdr) // 12
    if numrecs > maxrecs:
        raise Inconsistent(f"AG {agno}: too many keys in btree block {agbno}")
    ptrs = struct.unpack_from(f">{numrecs}I", block, hdr + maxrecs * 8)
    for ptr in ptrs:
        if not 0 < ptr < sb.agblocks:
            raise Inconsistent(f"AG {agno}: btree pointer {ptr} leaves the group")
        _walk(read, sb, agno, ptr, level - 1, out, visited)


# --- the log -------------------------------------------------------------------------------


def _check_log(read: ReadFn, sb: _Super) -> None:
    """Raise unless log recovery would change nothing but the superblock."""
    if sb.logstart == 0:
        raise NotUnderstood("the XFS log is on another device: cannot tell whether it is clean")
    agno, agbno = sb.logstart >> sb.agblklog, sb.logstart & ((1 << sb.agblklog) - 1)
    log = _Log(read, (agno * sb.agblocks + agbno) * sb.block_size, sb.logblocks * sb.block_size // BB)
    head = log.find_head()
    if head is None:
        return  # never written
    rec = log.last_record_before(head)
    if rec is None:
        raise Inconsistent("no log record found before the log head")
    if log.is_unmount_record(rec, head):
        return
    # Not unmounted: replay would run from the tail named by the last record to the head.
    tail = log.header(rec).tail_block
    blk = tail
    for _ in range(MAX_REPLAY_RECORDS):
        if blk == head:
            return
        header = log.header(blk)
        if not header.only_superblock(log.record_data(blk, header)):
            raise Inconsistent("the log holds changes not yet written back (mounted and not frozen?)")
        blk = (blk + header.blocks) % log.size
    raise Inconsistent("the log holds many records not yet written back")


@dataclass
class _RecordHeader:
    cycle: int
    length: int  # bytes of data
    tail_block: int
    num_ops: int
    header_blocks: int
    cycle_data: list[int]

    @property
    def blocks(self) -> int:
        return self.header_blocks + -(-self.length // BB)

    def only_superblock(self, data: bytes) -> bool:
        """True if every transaction in this record logs nothing but the primary superblock."""
        regions: dict[int, list[bytes]] = {}
        pos = 0
        for _ in range(self.num_ops):
            if pos + 12 > len(data):
                return False
            tid, length, _client, flags = struct.unpack_from(">IIBB", data, pos)
            pos += 12
            if flags & (OP_CONTINUE | OP_WAS_CONTINUED):
                return False  # a region split across records: not worth reassembling
            payload = data[pos : pos + length]
            pos += length
            if flags & (OP_START | OP_UNMOUNT) or not length:
                continue
            regions.setdefault(tid, []).append(payload)
        return all(_superblock_only_transaction(r) for r in regions.values())


def _superblock_only_transaction(regions: list[bytes]) -> bool:
    """Regions of one transaction: a header, then per item a format region and its data regions."""
    if not regions or len(regions[0]) < 4 or struct.unpack_from("<I", regions[0])[0] != TRANS_MAGIC:
        return False
    i = 1
    while i < len(regions):
        fmt = regions[i]
        if len(fmt) < 16:
            return False
        kind, nregions = struct.unpack_from("<HH", fmt)
        blkno = struct.unpack_from("<q", fmt, 8)[0]
        if kind != LI_BUF or blkno != 0 or nregions < 1:
            return False
        i += nregions
    return True


class _Log:
    def __init__(self, read: ReadFn, offset: int, size_blocks: int) -> None:
        self.read = read
        self.offset = offset
        self.size = size_blocks

    def block(self, n: int, count: int = 1) -> bytes:
        return self.read(self.offset + n * BB, count * BB)

    def cycle(self, n: int) -> int:
        first, second = struct.unpack_from(">II", self.block(n))
        return second if first == LOG_HEADER_MAGIC else first

    def find_head(self) -> int | None:
        """The first block after the last one written: where the cycle number drops."""
        first, last = self.cycle(0), self.cycle(self.size - 1)
        if first == 0:
            return None
        if first == last:
            return 0  # the log wrapped exactly at its end
        target = 0 if last == 0 else first - 1
        if last != target:
            raise Inconsistent("the log's cycle numbers are not in order")
        lo, hi = 0, self.size - 1  # cycle(lo) == first, cycle(hi) == target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cycle(mid) == first:
                lo = mid
            else:
                hi = mid
        return hi

    def last_record_before(self, head: int) -> int | None:
        for back in range(1, min(self.size, 4096) + 1):
            n = (head - back) % self.size
            if struct.unpack_from(">I", self.block(n))[0] == LOG_HEADER_MAGIC:
                return n
        return None

    def header(self, n: int) -> _RecordHeader:
        raw = self.block(n)
        magic, cycle, _version, length = struct.unpack_from(">IIII", raw)
        _lsn, tail_lsn = struct.unpack_from(">QQ", raw, 16)
        num_ops = struct.unpack_from(">I", raw, 40)[0]
        iclog_size = struct.unpack_from(">I", raw, 320)[0]
        if magic != LOG_HEADER_MAGIC or length > 1 << 20:
            raise Inconsistent(f"bad log record header at log block {n}")
        header_blocks = max(1, -(-iclog_size // (LOG_CYCLE_DATA_BLOCKS * BB))) if iclog_size > 32768 else 1
        cycle_data = list(struct.unpack_from(f">{LOG_CYCLE_DATA_BLOCKS}I", raw, 44))
        for extra in range(1, header_blocks):
            ext = self.block((n + extra) % self.size)
            cycle_data.extend(struct.unpack_from(f">{LOG_CYCLE_DATA_BLOCKS}I", ext, 4))
        tail_block = tail_lsn & 0xFFFFFFFF
        if tail_block >= self.size:
            raise Inconsistent("the log tail lies outside the log")
        return _RecordHeader(cycle, length, tail_block, num_ops, header_blocks, cycle_data)

    def record_data(self, n: int, header: _RecordHeader) -> bytes:
        """The record's data with the first word of each block restored from the header."""
        count = -(-header.length // BB)
        if count > len(header.cycle_data):
            raise Inconsistent("log record longer than its headers describe")
        out = bytearray()
        for i in range(count):
            blk = bytearray(self.block((n + header.header_blocks + i) % self.size))
            blk[0:4] = struct.pack(">I", header.cycle_data[i])
            out += blk
        return bytes(out[: header.length])

    def is_unmount_record(self, n: int, head: int) -> bool:
        header = self.header(n)
        if header.num_ops != 1 or (n + header.blocks) % self.size != head:
            return False
        data = self.record_data(n, header)
        return len(data) >= 12 and bool(data[9] & OP_UNMOUNT)
