"""The qemu-img operations a replica needs: thin qcow2 overlays, merging an overlay into its
backing file, and what an image holds. Every failure becomes a ReplicaWriteError with qemu-img's
own words (ENOSPC included), so a full disk reads as a one-line error."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from surepoint.replica.errors import ReplicaDamaged, ReplicaWriteError

QEMU_IMG_TIMEOUT = 3600.0


def _qemu_img(args: list[str], what: str, *, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    try:
        done = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ReplicaWriteError("qemu-img is not installed (package qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise ReplicaWriteError(f"{what}: qemu-img did not finish within {timeout:.0f} s") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        reason = detail[-1] if detail else f"qemu-img exited with {exc.returncode}"
        raise ReplicaWriteError(f"{what}: {reason}") from None
    return done.stdout


def create(path: str, size: int, backing: str | None = None) -> None:
    """A new empty qcow2 of `size` bytes; with `backing` (a name relative to the image's folder) an overlay."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    _qemu_img([*args, path, str(size)], f"create {path}")


def commit(overlay: str) -> None:
    """Copy the overlay's data into its backing file; the overlay keeps its data (-d), so the pair
    reads the same before, during and after: an interrupted commit loses nothing."""
    _qemu_img(["commit", "-q", "-d", "-f", "qcow2", overlay], f"merge {overlay} into its backing file")


def rebase_unsafe(overlay: str, backing: str) -> None:
    """Point the overlay at another backing file without copying (the caller knows both read the same)."""
    _qemu_img(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay], f"rebase {overlay}")


def info(path: str) -> dict[str, Any]:
    """qemu-img info of one image (not its backing chain)."""
    try:
        return json.loads(_qemu_img(["info", "--output=json", "-U", path], f"inspect {path}", timeout=60))
    except ReplicaWriteError as exc:
        raise ReplicaDamaged(str(exc)) from None


def allocated_bytes(path: str) -> int:
    """Bytes of guest data the image itself holds (its backing files left out)."""
    out = _qemu_img(["map", "--output=json", "-U", "-f", "qcow2", path], f"map {path}", timeout=300)
    return sum(e["length"] for e in json.loads(out) if e.get("data") and e.get("depth", 0) == 0)


def rebase_safe(overlay: str, backing: str) -> None:
    """Point the overlay at another backing file in its chain, first copying into it whatever the
    files between them held, so it reads the same (interrupted, it still does: the pointer moves last)."""
    _qemu_img(["rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay], f"rebase {overlay}")


def convert_from_raw(raw: str, path: str) -> None:
    """A thin qcow2 at `path` with the contents of a raw image (zero blocks left unallocated)."""
    _qemu_img(["convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], f"convert {raw}")
