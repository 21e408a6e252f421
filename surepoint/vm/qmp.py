"""A small synchronous client for a QEMU QMP socket, over the asyncio `qemu.qmp` library.

The backup code is synchronous, so this runs `qemu.qmp.QMPClient` on a private event loop and gives
every call a timeout, turning the library's exceptions into surepoint.vm errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from surepoint.vm.errors import QmpCommandError, QmpError, QmpTimeout

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class BlockDevice:
    """A guest disk as query-block reports it: the device and the top block node behind it."""

    device: str
    qdev: str
    node_name: str
    driver: str
    size: int
    filename: str


class QmpConnection:
    """One QMP session with a QEMU process (unix socket path, or (host, port) for TCP).

    Not for use from inside a running asyncio loop: every call runs the private loop to completion.
    """

    def __init__(self, address: str | tuple[str, int], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("surepoint")
        self._backlog: list[dict[str, Any]] = []
        try:
            self._run(self._client.connect(address), timeout, "connect")
        except BaseException:
            self._loop.close()
            raise

    # -- plumbing -------------------------------------------------------------------------

    def _run(self, awaitable: Awaitable[T], timeout: float | None, what: str) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(awaitable, timeout))
        except TimeoutError:
            raise QmpTimeout(f"QMP {what} on {self.address!r}: no answer within {timeout:g} s") from None
        except ExecuteError as exc:
            raise QmpCommandError(what, exc.error_class, exc.error.error.desc) from None
        except ConnectError as exc:
            raise QmpError(f"cannot connect to QMP socket {self.address!r}: {exc}") from None
        except ExecInterruptedError:
            raise QmpError(f"QMP {what}: QEMU closed the connection (did it exit?)") from None
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {what} on {self.address!r}: {exc}") from None

    def execute(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one QMP command and return its result.

        Keyword names may use '_' for '-' (node_name= becomes node-name); use execute_args() to pass
        a dict as it is.
        """
        return self.execute_args(command, {k.replace("_", "-"): v for k, v in args.items()}, timeout)

    def execute_args(self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Run one QMP command with an argument dict passed verbatim."""
        if self._loop.is_closed():
            raise QmpError("QMP connection is closed")
        wait = self.timeout if timeout is None else timeout
        return self._run(self._client.execute(command, args or None), wait, command)

    def close(self) -> None:
        """Disconnect; QEMU keeps running."""
        if self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 5))
        except (TimeoutError, QMPError, OSError, EOFError):  # QEMU may have just quit
            pass
        finally:
            self._loop.close()

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events ---------------------------------------------------------------------------

    def _pull_events(self, wait: float) -> None:
        """Move events QEMU sent into the backlog, waiting up to `wait` seconds for the first one."""
        events = self._client.events
        if events.empty() and wait > 0:
            try:
                first = self._loop.run_until_complete(asyncio.wait_for(events.get(), wait))
                self._backlog.append(dict(first))
            except TimeoutError:
                return
        self._backlog.extend(dict(e) for e in events.clear())

    def wait_event(
        self, name: str, timeout: float | None = None, match: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Wait for (and consume) the next event called `name` whose data `match` accepts."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, event in enumerate(self._backlog):
                if event.get("event") == name and (match is None or match(event.get("data", {}))):
                    return self._backlog.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout(f"QMP event {name} did not come in time")
            self._pull_events(min(left, 0.5))

    def events(self) -> list[dict[str, Any]]:
        """All events received so far and not consumed; clears them."""
        self._pull_events(0)
        out, self._backlog = self._backlog, []
        return out

    # -- queries --------------------------------------------------------------------------

    def query_block(self) -> list[dict[str, Any]]:
        """query-block: the guest's block devices and what is inserted in them."""
        return self.execute("query-block")

    def query_named_block_nodes(self, flat: bool = True) -> list[dict[str, Any]]:
        """query-named-block-nodes: every named node of the block graph (flat: without backing trees)."""
        return self.execute("query-named-block-nodes", flat=flat)

    def query_block_jobs(self) -> list[dict[str, Any]]:
        return self.execute("query-block-jobs")

    def block_node(self, node_name: str) -> dict[str, Any]:
        """The query-named-block-nodes entry of one node; QmpError if there is no such node."""
        for node in self.query_named_block_nodes():
            if node.get("node-name") == node_name:
                return node
        raise QmpError(f"no block node named {node_name!r}")

    def block_devices(self) -> list[BlockDevice]:
        """The guest's disks (devices with a medium inserted), each with its top node name."""
        devices = []
        for info in self.query_block():
            inserted = info.get("inserted")
            if not inserted:
                continue
            image = inserted.get("image", {})
            devices.append(
                BlockDevice(
                    device=info.get("device", ""),
                    qdev=info.get("qdev", ""),
                    node_name=inserted.get("node-name", ""),
                    driver=inserted.get("drv", ""),
                    size=int(image.get("virtual-size", 0)),
                    filename=inserted.get("file", ""),
                )
            )
        return devices

    def resolve_node(self, disk: str) -> BlockDevice:
        """Find a disk by node name, device name, qdev id or qdev path."""
        for dev in self.block_devices():
            parts = dev.qdev.split("/")  # /machine/peripheral/ID/virtio-backend for -device ...,id=ID
            qdev_id = parts[3] if dev.qdev.startswith("/machine/peripheral/") and len(parts) > 3 else ""
            if disk in (dev.node_name, dev.device, dev.qdev) or (qdev_id and disk == qdev_id):
                return dev
        raise QmpError(f"the VM has no disk called {disk!r}")
