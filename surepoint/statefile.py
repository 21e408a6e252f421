"""Small JSON records of running things (mounts, instant recoveries, labs), replaced atomically.

A record is written to a temporary name beside it, fsynced and renamed over the old one, so a
reader (the next command, cleaning up after a crash) sees the old record or the new one, never a
torn one.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json_atomically(path: str, data: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
