"""Filesystem freeze on the host: fsfreeze(8) on each mount point, thawed in reverse order."""

from __future__ import annotations

from surepoint.consistency.runner import CommandFailed
from surepoint.consistency.writer import Component, Writer


class FilesystemFreezeWriter(Writer):
    name = "fsfreeze"
    level = "filesystem"

    def identify(self) -> list[Component]:
        mounts = self.config.get("mountpoints") or []
        if not mounts:
            raise CommandFailed("fsfreeze writer needs `mountpoints`")
        return [Component("filesystems", "data", list(mounts))]

    def prepare(self) -> None:
        for mount in self.config["mountpoints"]:
            self.runner.run(["findmnt", "--mountpoint", mount], timeout=10).check()
        self._frozen: list[str] = []

    def freeze(self) -> None:
        for mount in self.config["mountpoints"]:
            self.runner.run(["fsfreeze", "--freeze", mount], timeout=float(self.config.get("timeout", 30))).check()
            self._frozen.append(mount)

    def thaw(self) -> None:
        errors = []
        while getattr(self, "_frozen", []):
            mount = self._frozen.pop()
            result = self.runner.run(["fsfreeze", "--unfreeze", mount], timeout=30)
            if result.returncode != 0:
                errors.append(f"{mount}: {result.stderr.strip()}")
        if errors:
            raise CommandFailed("thaw failed: " + "; ".join(errors))

    def abort(self) -> None:
        self.thaw()
