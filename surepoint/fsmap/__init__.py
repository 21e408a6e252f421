"""Free-block maps: which byte ranges of a disk its filesystems mark free, so a backup can skip them.

`map_disk(read, size)` walks the partition table (MBR, GPT), LVM2 physical volumes inside it
(linear logical volumes) and the filesystems it finds: ext2/3/4 (block bitmaps), XFS (free-space
B+trees) and Linux swap (skipped whole). Everything is parsed from bytes the caller reads from a
point-in-time view of the disk; nothing is mounted. Whatever the reader does not understand, or
whose metadata disagrees with itself, is read in full, with the reason.
"""

from surepoint.fsmap.disk import DiskMap, map_disk
from surepoint.fsmap.volume import Status, Volume

__all__ = ["DiskMap", "Status", "Volume", "map_disk"]
