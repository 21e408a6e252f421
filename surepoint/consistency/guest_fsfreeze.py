"""Filesystem freeze inside a KVM guest through qemu-guest-agent (guest-fsfreeze-freeze / thaw)."""

from __future__ import annotations

from surepoint.consistency.runner import CommandFailed
from surepoint.consistency.writer import Component, Writer
from surepoint.vm.errors import GuestAgentError
from surepoint.vm.guest_agent import GuestAgent


class GuestFsFreezeWriter(Writer):
    name = "guest-fsfreeze"
    level = "filesystem"

    def __init__(self, agent: GuestAgent, config: dict | None = None) -> None:
        super().__init__(None, config)  # type: ignore[arg-type]  # talks to the agent, not a runner
        self.agent = agent
        self._frozen = False
        self.error: str | None = None  # why the last freeze failed

    @property
    def frozen(self) -> bool:
        """True between a freeze that succeeded and the thaw."""
        return self._frozen

    def identify(self) -> list[Component]:
        try:
            self.agent.ping(timeout=float(self.config.get("ping_timeout", 10)))
        except GuestAgentError as exc:
            raise CommandFailed(f"guest agent does not answer: {exc}") from None
        return [Component("guest filesystems", "data", ["(all mounted)"])]

    def freeze(self) -> None:
        try:
            count = self.agent.fsfreeze_freeze(timeout=float(self.config.get("timeout", 30)))
        except GuestAgentError as exc:
            self.error = f"guest fsfreeze failed: {exc}"
            raise CommandFailed(self.error) from None
        self._frozen = True
        self.metadata["frozen_filesystems"] = count

    def thaw(self) -> None:
        if not self._frozen:
            return
        self._frozen = False
        try:
            self.agent.fsfreeze_thaw(timeout=30)
        except GuestAgentError as exc:
            raise CommandFailed(f"guest thaw failed: {exc}") from None

    def abort(self) -> None:
        self.thaw()
