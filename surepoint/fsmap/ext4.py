"""Free blocks of an ext2/ext3/ext4 filesystem, from its group descriptors and block bitmaps.

Handles 32- and 64-bit descriptors, flex_bg (bitmaps of one group stored in another), bigalloc
clusters, and groups whose bitmap was never written (BLOCK_UNINIT: their use is computed from
the layout and must agree with the group's free count). Trust is earned, not assumed: the
superblock, every descriptor and a sample of bitmaps must match their checksums when the
filesystem has them, every bitmap must agree with its group's free count, and a journal that
still needs recovery (a filesystem snapshotted while mounted and not frozen) means the bitmaps
may be stale, so the filesystem is read in full.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from surepoint.fsmap.bitmaps import clear_runs, count_clear
from surepoint.fsmap.checksums import crc16, crc32c_raw
from surepoint.fsmap.volume import Inconsistent, NotUnderstood, ReadFn, bounded_read
from surepoint.repo.extents import Extent, merge

SUPERBLOCK_OFFSET = 1024
MAGIC = 0xEF53

COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_64BIT = 0x80
INCOMPAT_CSUM_SEED = 0x2000
# filetype, recover, extents, 64bit, mmp, flex_bg, ea_inode, dirdata, csum_seed, largedir,
# inline_data, encrypt, casefold: none of them changes what a block bitmap means.
INCOMPAT_KNOWN = 0x2 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_HAS_SNAPSHOT = 0x80
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400 | 0x1000 | 0x2000 | 0x8000
RO_COMPAT_KNOWN |= 0x10000
STATE_VALID = 0x1
STATE_ERRORS = 0x2
BG_BLOCK_UNINIT = 0x2
# Bitmap checksums cost ~1 ms each in Python; beyond this many groups an even sample is checked
# (every group's bitmap is still counted against its descriptor).
BITMAP_CHECKSUM_SAMPLE = 256


def probe(read: ReadFn, size: int) -> bool:
    if size < SUPERBLOCK_OFFSET + 1024:
        return False
    return struct.unpack_from("<H", read(SUPERBLOCK_OFFSET + 0x38, 2))[0] == MAGIC


class _Super:
    def __init__(self, sb: bytes) -> None:
        u32 = lambda off: struct.unpack_from("<I", sb, off)[0]  # noqa: E731
        u16 = lambda off: struct.unpack_from("<H", sb, off)[0]  # noqa: E731
        self.raw = sb
        self.compat, self.incompat, self.ro_compat = u32(0x5C), u32(0x60), u32(0x64)
        self.is64 = bool(self.incompat & INCOMPAT_64BIT)
        self.blocks = u32(0x4) | (u32(0x150) << 32 if self.is64 else 0)
        self.first_data_block = u32(0x14)
        log_block, log_cluster = u32(0x18), u32(0x1C)
        if log_block > 6 or log_cluster > 16:
            raise Inconsistent(f"implausible block size (log {log_block}, cluster log {log_cluster})")
        self.block_size = 1024 << log_block
        self.bigalloc = bool(self.ro_compat & RO_COMPAT_BIGALLOC)
        self.cluster_ratio = (1 << (log_cluster - log_block)) if self.bigalloc and log_cluster >= log_block else 1
        self.blocks_per_group = u32(0x20)
        self.clusters_per_group = u32(0x24) if self.bigalloc else self.blocks_per_group
        self.inodes_per_group = u32(0x28)
        self.state = u16(0x3A)
        self.rev_level = u32(0x4C)
        self.inode_size = u16(0x58) if self.rev_level >= 1 else 128
        self.uuid = sb[0x68:0x78]
        self.reserved_gdt_blocks = u16(0xCE)
        self.desc_size = u16(0xFE) if self.is64 else 32
        self.backup_bgs = (u32(0x24C), u32(0x250))
        self.checksum_seed = u32(0x270)
        self.checksum = u32(0x3FC)


def free_extents(read: ReadFn, size: int) -> list[Extent]:
    """Free byte ranges of the filesystem at offset 0 of `read`, whose volume is `size` bytes."""
    read = bounded_read(read, size)
    sb = _Super(read(SUPERBLOCK_OFFSET, 1024))
    _check_superblock(sb, size)
    metadata_csum = bool(sb.ro_compat & RO_COMPAT_METADATA_CSUM)
    gdt_csum = bool(sb.ro_compat & RO_COMPAT_GDT_CSUM) and not metadata_csum
    seed = sb.checksum_seed if sb.incompat & INCOMPAT_CSUM_SEED else crc32c_raw(sb.uuid)

    groups = -(-(sb.blocks - sb.first_data_block) // sb.blocks_per_group)
    gdt_offset = (SUPERBLOCK_OFFSET // sb.block_size + 1) * sb.block_size  # the block after the superblock
    gdt = read(gdt_offset, groups * sb.desc_size)
    descriptors = [_descriptor(sb, gdt, g, metadata_csum, gdt_csum, seed) for g in range(groups)]
    itable_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)

    total_clusters = -(-(sb.blocks - sb.first_data_block) // sb.cluster_ratio)
    cluster_bytes = sb.block_size * sb.cluster_ratio
    base = sb.first_data_block * sb.block_size
    sample = max(1, groups // BITMAP_CHECKSUM_SAMPLE)
    uninit_layout: list[tuple[int, int]] | None = None
    free: list[Extent] = []
    for g, desc in enumerate(descriptors):
        first_cluster = g * sb.clusters_per_group
        nclusters = min(sb.clusters_per_group, total_clusters - first_cluster)
        bitmap_block, free_count, flags, csum = desc.block_bitmap, desc.free, desc.flags, desc.bitmap_csum
        if flags & BG_BLOCK_UNINIT and (metadata_csum or gdt_csum):
            if sb.bigalloc:
                continue  # layout of an uninitialised bigalloc group not computed: keep it all
            if uninit_layout is None:
                uninit_layout = sorted(r for d in descriptors for r in d.metadata(itable_blocks))
            runs = _uninit_free_runs(sb, g, nclusters, uninit_layout)
            if sum(n for _, n in runs) != free_count:
                continue  # our layout disagrees with the descriptor: keep the group
        else:
            if not sb.first_data_block <= bitmap_block < sb.blocks:
                raise Inconsistent(f"group {g}: block bitmap at block {bitmap_block} lies outside the filesystem")
            bitmap = read(bitmap_block * sb.block_size, sb.block_size)
            nbytes = sb.clusters_per_group // 8
            if metadata_csum and g % sample == 0:
                expect = crc32c_raw(bitmap[:nbytes], seed)
                mask = 0xFFFFFFFF if sb.desc_size >= 64 else 0xFFFF
                if expect & mask != csum:
                    raise Inconsistent(f"group {g}: block bitmap checksum does not match")
            counted = count_clear(bitmap, nclusters)
            if counted != free_count:
                raise Inconsistent(
                    f"group {g}: block bitmap shows {counted} free clusters, its descriptor says {free_count}"
                )
            runs = list(clear_runs(bitmap, nclusters))
        for start, count in runs:
            free.append(Extent(base + (first_cluster + start) * cluster_bytes, count * cluster_bytes))
    return merge(free)


def _check_superblock(sb: _Super, size: int) -> None:
    if sb.incompat & INCOMPAT_JOURNAL_DEV:
        raise NotUnderstood("an external ext4 journal device, not a filesystem")
    unknown = sb.incompat & ~INCOMPAT_KNOWN
    if unknown:
        raise NotUnderstood(f"unknown ext4 incompatible features 0x{unknown:x}")
    unknown = sb.ro_compat & ~RO_COMPAT_KNOWN
    if unknown:
        raise NotUnderstood(f"unknown ext4 read-only features 0x{unknown:x}")
    if sb.incompat & INCOMPAT_META_BG:
        raise NotUnderstood("ext4 meta_bg layout is not supported")
    if sb.ro_compat & RO_COMPAT_METADATA_CSUM:
        if sb.raw[0x175] != 1:
            raise NotUnderstood(f"unknown ext4 checksum type {sb.raw[0x175]}")
        if crc32c_raw(sb.raw[:0x3FC]) != sb.checksum:
            raise Inconsistent("superblock checksum does not match")
    if sb.incompat & INCOMPAT_RECOVER:
        raise Inconsistent("the journal needs recovery (mounted and not frozen?): the bitmaps may be stale")
    if sb.state & STATE_ERRORS:
        raise Inconsistent("the filesystem is marked as having errors")
    if not sb.compat & COMPAT_HAS_JOURNAL and not sb.state & STATE_VALID:
        raise Inconsistent("no journal and not cleanly unmounted: the bitmaps may be stale")
    if sb.blocks_per_group == 0 or sb.blocks_per_group > 8 * sb.block_size * sb.cluster_ratio:
        raise Inconsistent(f"implausible blocks per group ({sb.blocks_per_group})")
    if sb.clusters_per_group == 0 or sb.clusters_per_group > 8 * sb.block_size or sb.clusters_per_group % 8:
        raise Inconsistent(f"implausible clusters per group ({sb.clusters_per_group})")
    if sb.bigalloc and sb.blocks_per_group != sb.clusters_per_group * sb.cluster_ratio:
        raise Inconsistent("blocks and clusters per group disagree")
    if sb.desc_size < 32 or sb.desc_size & (sb.desc_size - 1) or sb.desc_size > sb.block_size:
        raise Inconsistent(f"implausible group descriptor size {sb.desc_size}")
    if sb.blocks <= sb.first_data_block or sb.blocks * sb.block_size > size:
        raise Inconsistent(f"the filesystem ({sb.blocks} blocks of {sb.block_size}) is larger than its volume")


@dataclass(frozen=True)
class _Descriptor:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free: int  # free clusters
    flags: int
    bitmap_csum: int

    def metadata(self, itable_blocks: int) -> list[tuple[int, int]]:
        """(first block, count) of the group's bitmaps and inode table, wherever flex_bg put them."""
        return [(self.block_bitmap, 1), (self.inode_bitmap, 1), (self.inode_table, itable_blocks)]


def _descriptor(sb: _Super, gdt: bytes, g: int, metadata_csum: bool, gdt_csum: bool, seed: int) -> _Descriptor:
    """Group g's descriptor, checksum-verified."""
    size = sb.desc_size
    d = gdt[g * size : (g + 1) * size]
    stored = struct.unpack_from("<H", d, 0x1E)[0]
    if metadata_csum:
        crc = crc32c_raw(struct.pack("<I", g), seed)
        crc = crc32c_raw(d[:0x1E] + b"\0\0" + d[0x20:], crc)
        if crc & 0xFFFF != stored:
            raise Inconsistent(f"group {g}: descriptor checksum does not match")
    elif gdt_csum:
        crc = crc16(sb.uuid)
        crc = crc16(struct.pack("<I", g), crc)
        crc = crc16(d[:0x1E], crc)
        if size > 0x20:
            crc = crc16(d[0x20:], crc)
        if crc != stored:
            raise Inconsistent(f"group {g}: descriptor checksum does not match")
    bitmap, ibitmap, itable, free, _free_inodes, _dirs, flags = struct.unpack_from("<IIIHHHH", d, 0)
    csum = struct.unpack_from("<H", d, 0x18)[0]
    if sb.is64 and size >= 64:
        hi_bitmap, hi_ibitmap, hi_itable, hi_free = struct.unpack_from("<IIIH", d, 0x20)
        bitmap |= hi_bitmap << 32
        ibitmap |= hi_ibitmap << 32
        itable |= hi_itable << 32
        free |= hi_free << 16
        csum |= struct.unpack_from("<H", d, 0x38)[0] << 16
    return _Descriptor(bitmap, ibitmap, itable, free, flags, csum)


def _has_super(sb: _Super, g: int) -> bool:
    if g == 0:
        return True
    if sb.compat & COMPAT_SPARSE_SUPER2:
        return g in sb.backup_bgs
    if not sb.ro_compat & RO_COMPAT_SPARSE_SUPER or g == 1:
        return True
    for base in (3, 5, 7):
        n = base
        while n < g:
            n *= base
        if n == g:
            return True
    return False


def _uninit_free_runs(sb: _Super, g: int, nclusters: int, layout: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Free runs of a group whose bitmap was never written: everything but its fixed metadata."""
    first = sb.first_data_block + g * sb.blocks_per_group
    end = first + nclusters
    used: list[tuple[int, int]] = []
    if _has_super(sb, g):
        groups = -(-(sb.blocks - sb.first_data_block) // sb.blocks_per_group)
        gdt_blocks = -(-groups * sb.desc_size // sb.block_size)
        used.append((first, 1 + gdt_blocks + sb.reserved_gdt_blocks))
    # layout is sorted; no entry is longer than a group, so earlier ones cannot reach this group.
    i = bisect.bisect_left(layout, (first - sb.blocks_per_group, 0))
    while i < len(layout) and layout[i][0] < end:
        start, count = layout[i]
        lo, hi = max(start, first), min(start + count, end)
        if lo < hi:
            used.append((lo, hi - lo))
        i += 1
    runs: list[tuple[int, int]] = []
    pos = first
    for start, count in sorted(used):
        if start > pos:
            runs.append((pos - first, start - pos))
        pos = max(pos, start + count)
    if pos < end:
        runs.append((pos - first, end - pos))
    return runs
