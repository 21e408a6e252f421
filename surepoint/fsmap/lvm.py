"""LVM2 physical volumes inside a disk: the label, the volume group's text metadata, and linear LVs.

Only what free-space mapping needs: which byte ranges of the disk make up each logical volume,
and which physical extents no LV uses. A logical volume qualifies only when it is visible, made
of plain linear segments on physical volumes of this disk, and nothing else builds on it (no
snapshot of it, not the data of a thin pool, cache or RAID): only then is its content a
filesystem and nothing more.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

from surepoint.fsmap.volume import Inconsistent, ReadFn
from surepoint.repo.extents import Extent

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
MAX_METADATA = 4 << 20


def _crc(data: bytes, crc: int = INITIAL_CRC) -> int:
    """LVM's checksum: the CRC32 polynomial with its own initial value and no final inversion."""
    return ~zlib.crc32(data, ~crc & 0xFFFFFFFF) & 0xFFFFFFFF


@dataclass
class PhysicalVolume:
    """An LVM2 label found at `start` on the disk, with its newest readable metadata text."""

    uuid: str  # 32 characters, no dashes
    start: int
    size: int
    metadata: str | None


def read_label(read: ReadFn, start: int, size: int) -> PhysicalVolume | None:
    """The PV label in the first four sectors of a region, or None if there is none."""
    for sector in range(4):
        if (sector + 1) * SECTOR > size:
            return None
        raw = read(start + sector * SECTOR, SECTOR)
        if raw[:8] != LABEL_ID or raw[24:32] != LABEL_TYPE:
            continue
        sector_xl, crc_xl, offset_xl = struct.unpack_from("<QII", raw, 8)
        if sector_xl != sector or _crc(raw[20:]) != crc_xl or not 32 <= offset_xl <= SECTOR - 48:
            raise Inconsistent("LVM label checksum or position does not match")
        uuid = raw[offset_xl : offset_xl + 32].decode("ascii", "replace")
        pos = offset_xl + 40
        areas: list[list[tuple[int, int]]] = [[], []]  # data areas, metadata areas
        for kind in (0, 1):
            while True:
                if pos + 16 > SECTOR:
                    raise Inconsistent("LVM PV header runs past its sector")
                offset, length = struct.unpack_from("<QQ", raw, pos)
                pos += 16
                if offset == 0:
                    break
                areas[kind].append((offset, length))
        metadata = None
        best = -1
        for offset, length in areas[1]:
            text = _read_metadata_area(read, start, size, offset, length)
            if text is not None:
                seqno = _seqno(text)
                if seqno > best:
                    metadata, best = text, seqno
        return PhysicalVolume(uuid, start, size, metadata)
    return None


def _read_metadata_area(read: ReadFn, start: int, size: int, offset: int, length: int) -> str | None:
    if offset + length > size or length < 2 * MDA_HEADER_SIZE:
        raise Inconsistent("LVM metadata area lies outside the physical volume")
    header = read(start + offset, MDA_HEADER_SIZE)
    if header[4:20] != MDA_MAGIC or _crc(header[4:]) != struct.unpack_from("<I", header)[0]:
        raise Inconsistent("LVM metadata area header is damaged")
    text_offset, text_size, text_crc, _flags = struct.unpack_from("<QQII", header, 40)
    if text_size == 0:
        return None
    if text_size > MAX_METADATA or text_size > length - MDA_HEADER_SIZE or text_offset >= length:
        raise Inconsistent("LVM metadata text has an implausible size")
    first = min(text_size, length - text_offset)
    raw = read(start + offset + text_offset, first)
    if first < text_size:  # the circular buffer wrapped
        raw += read(start + offset + MDA_HEADER_SIZE, text_size - first)
    if _crc(raw) != text_crc:
        raise Inconsistent("LVM metadata text checksum does not match")
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _seqno(text: str) -> int:
    match = re.search(r"\bseqno\s*=\s*(\d+)", text)
    return int(match.group(1)) if match else 0


# --- the metadata text: nested sections of key = value ----------------------------------------

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|[\[\]{}=,]|[^\s\[\]{}=,"#]+')


def parse_config(text: str) -> dict:
    """The LVM text format as nested dicts; values are str, int or lists of them."""
    tokens = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    pos = 0

    def value(tok: str) -> str | int:
        if tok.startswith('"'):
            return re.sub(r"\\(.)", r"\1", tok[1:-1])
        try:
            return int(tok)
        except ValueError:
            return tok

    def section(end: str | None) -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == end:
                pos += 1
                return out
            if pos + 1 >= len(tokens):
                break
            nxt = tokens[pos + 1]
            pos += 2
            if nxt == "{":
                out[value(tok)] = section("}")
            elif nxt == "=":
                if pos < len(tokens) and tokens[pos] == "[":
                    pos += 1
                    items = []
                    while pos < len(tokens) and tokens[pos] != "]":
                        if tokens[pos] != ",":
                            items.append(value(tokens[pos]))
                        pos += 1
                    pos += 1
                    out[value(tok)] = items
                elif pos < len(tokens):
                    out[value(tok)] = value(tokens[pos])
                    pos += 1
            else:
                raise Inconsistent("LVM metadata cannot be parsed")
        if end is not None:
            raise Inconsistent("LVM metadata ends inside a section")
        return out

    return section(None)


# --- logical volumes as byte ranges of the disk ---------------------------------------------


@dataclass
class LogicalVolume:
    name: str  # "vg/lv"
    pieces: list[Extent] = field(default_factory=list)  # disk byte ranges, in LV order
    unusable: str = ""  # why its content cannot be mapped, if it cannot

    @property
    def size(self) -> int:
        return sum(p.length for p in self.pieces)

    def reader(self, read: ReadFn) -> ReadFn:
        """Read the LV's bytes by LV offset."""
        starts = []
        pos = 0
        for piece in self.pieces:
            starts.append(pos)
            pos += piece.length

        def inner(offset: int, length: int) -> bytes:
            out = bytearray()
            for start, piece in zip(starts, self.pieces, strict=True):
                lo, hi = max(offset, start), min(offset + length, start + piece.length)
                if lo < hi:
                    out += read(piece.offset + lo - start, hi - lo)
            return bytes(out)

        return inner

    def to_disk(self, extents: list[Extent]) -> list[Extent]:
        """Map LV byte ranges to disk byte ranges."""
        out = []
        pos = 0
        for piece in self.pieces:
            for e in extents:
                lo, hi = max(e.offset, pos), min(e.end, pos + piece.length)
                if lo < hi:
                    out.append(Extent(piece.offset + lo - pos, hi - lo))
            pos += piece.length
        return out


@dataclass
class VolumeGroup:
    name: str
    logical_volumes: list[LogicalVolume]
    unallocated: list[Extent]  # physical extents of this disk's PVs that no LV uses


def volume_groups(pvs: list[PhysicalVolume]) -> list[VolumeGroup]:
    """The volume groups described by the PVs of one disk, newest metadata first per group."""
    texts: dict[str, tuple[int, dict]] = {}
    for pv in pvs:
        if pv.metadata is None:
            continue
        config = parse_config(pv.metadata)
        for name, vg in config.items():
            if isinstance(vg, dict) and "physical_volumes" in vg:
                seqno = int(vg.get("seqno", 0))
                if name not in texts or texts[name][0] < seqno:
                    texts[name] = (seqno, vg)
    by_uuid = {pv.uuid: pv for pv in pvs}
    return [_volume_group(name, vg, by_uuid) for name, (_seq, vg) in sorted(texts.items())]


def _volume_group(name: str, vg: dict, by_uuid: dict[str, PhysicalVolume]) -> VolumeGroup:
    extent_bytes = _int(vg, "extent_size") * SECTOR
    if extent_bytes <= 0:
        raise Inconsistent(f"volume group {name}: bad extent size")
    pv_area: dict[str, tuple[int, int] | None] = {}  # pv key -> (first PE byte on disk, PE count)
    for key, pv in vg.get("physical_volumes", {}).items():
        found = by_uuid.get(str(pv.get("id", "")).replace("-", ""))
        if found is None:
            pv_area[key] = None  # on another disk
            continue
        pe_start = _int(pv, "pe_start") * SECTOR
        pe_count = _int(pv, "pe_count")
        if pe_start + pe_count * extent_bytes > found.size:
            raise Inconsistent(f"volume group {name}: physical volume {key} is larger than its partition")
        pv_area[key] = (found.start + pe_start, pe_count)
    lvs = vg.get("logical_volumes", {})
    referenced: set[str] = set()  # LV names that segments of other LVs point to
    for lv in lvs.values():
        for seg in _segments(lv):
            for key, val in seg.items():
                if key != "stripes":
                    referenced.update(v for v in (val if isinstance(val, list) else [val]) if isinstance(v, str))
    used: dict[str, list[tuple[int, int]]] = {key: [] for key in pv_area}
    result = []
    for lv_name, lv in lvs.items():
        volume = LogicalVolume(f"{name}/{lv_name}")
        for seg in _segments(lv):
            stripes = seg.get("stripes", [])
            for i in range(0, len(stripes) - 1, 2):
                if stripes[i] in used:
                    count = _int(seg, "extent_count") // max(1, len(stripes) // 2)
                    used[stripes[i]].append((int(stripes[i + 1]), count))
            if seg.get("type") != "striped" or len(stripes) != 2:
                volume.unusable = volume.unusable or f"segment type {seg.get('type')!r} is not linear"
                continue
            area = pv_area.get(stripes[0])
            if area is None:
                volume.unusable = volume.unusable or "lies partly on another disk"
                continue
            first_pe, count = int(stripes[1]), _int(seg, "extent_count")
            if first_pe + count > area[1]:
                raise Inconsistent(f"logical volume {volume.name} runs past its physical volume")
            volume.pieces.append(Extent(area[0] + first_pe * extent_bytes, count * extent_bytes))
        if "VISIBLE" not in lv.get("status", []):
            volume.unusable = volume.unusable or "a hidden volume (part of another volume)"
        elif lv_name in referenced:
            volume.unusable = volume.unusable or "another volume (snapshot, pool, cache) builds on it"
        result.append(volume)
    unallocated = []
    for key, area in pv_area.items():
        if area is None:
            continue
        taken = sorted(used[key])
        pos = 0
        for first, count in taken + [(area[1], 0)]:
            if first > pos:
                unallocated.append(Extent(area[0] + pos * extent_bytes, (first - pos) * extent_bytes))
            pos = max(pos, first + count)
    return VolumeGroup(name, result, unallocated)


def _segments(lv: dict) -> list[dict]:
    count = _int(lv, "segment_count")
    segs = [lv.get(f"segment{i}") for i in range(1, count + 1)]
    if any(not isinstance(s, dict) for s in segs):
        raise Inconsistent("LVM metadata lists a missing segment")
    return sorted(segs, key=lambda s: _int(s, "start_extent"))


def _int(section: dict, key: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or value < 0:
        raise Inconsistent(f"LVM metadata: bad or missing {key}")
    return value
