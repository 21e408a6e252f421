"""User scripts around the freeze: a pre-freeze and a post-thaw command (argument vectors), with timeouts."""

from __future__ import annotations

from surepoint.consistency.runner import CommandFailed
from surepoint.consistency.writer import Component, Writer


class ScriptWriter(Writer):
    name = "script"

    def __init__(self, runner, config: dict | None = None) -> None:
        super().__init__(runner, config)
        self.name = f"script:{self.config.get('name', 'user')}"
        self.level = self.config.get("level", "application")

    def identify(self) -> list[Component]:
        for key in ("pre_freeze", "post_thaw"):
            value = self.config.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
                raise CommandFailed(f'{key} must be a list of arguments, e.g. ["/usr/local/bin/quiesce", "--fast"]')
        return []

    def freeze(self) -> None:
        if self.config.get("pre_freeze"):
            result = self.runner.run(self.config["pre_freeze"], timeout=float(self.config.get("timeout", 60)))
            self.metadata["pre_freeze_output"] = (result.stdout + result.stderr)[-2000:]
            result.check()
            self._ran_pre = True

    def thaw(self) -> None:
        if self.config.get("post_thaw") and getattr(self, "_ran_pre", True):
            result = self.runner.run(self.config["post_thaw"], timeout=float(self.config.get("timeout", 60)))
            self.metadata["post_thaw_output"] = (result.stdout + result.stderr)[-2000:]
            result.check()
