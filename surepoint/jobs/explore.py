"""Item-level recovery: open the explore engine of an application on a mounted restore point, export items.

The engines (explore_postgresql.py, explore_mariadb.py, explore_sqlite.py) share
explore_base.py: the overlay, the throw-away server's start and stop, the export sink.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from surepoint.catalog import Catalog
from surepoint.errors import InvalidArgument
from surepoint.events import EventRecorder
from surepoint.jobs.app_restore import mounted_point, writer_metadata
from surepoint.jobs.explore_base import Explorer, ExportResult, ExportSink, split_item
from surepoint.jobs.explore_mariadb import MariaDBExplorer
from surepoint.jobs.explore_postgresql import PostgresExplorer
from surepoint.jobs.explore_sqlite import SqliteExplorer
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import Repository

EXPLORERS = {"postgresql": PostgresExplorer, "mariadb": MariaDBExplorer, "sqlite": SqliteExplorer}
__all__ = ["EXPLORERS", "ExportResult", "export", "open_explorer", "record"]


@contextlib.contextmanager
def open_explorer(
    writer: str, repository: Repository, point: RestorePoint, say: Callable[[str], None]
) -> Iterator[Explorer]:
    """The point mounted, an overlay of the application's files, the throw-away server: an Explorer."""
    if writer not in EXPLORERS:
        raise InvalidArgument(f"explore knows {', '.join(EXPLORERS)}, not {writer!r}")
    metadata = writer_metadata(point, writer)
    with mounted_point(repository, point, say) as roots, EXPLORERS[writer](roots, metadata) as explorer:
        yield explorer


def export(
    explorer: Explorer,
    item: str,
    target: str,
    *,
    where: str | None,
    fmt: str | None,
    started: float,
    result: ExportResult,
) -> None:
    _, _, table = split_item(item)
    formats = explorer.table_formats if table else explorer.database_formats
    fmt = fmt or formats[0]
    if fmt not in formats:
        what = "a table" if table else "a whole database"
        raise InvalidArgument(f"{explorer.title}: {what} exports as {' or '.join(formats)}, not {fmt!r}")
    if where and not table:
        raise InvalidArgument("--where needs a table: DB.TABLE")
    result.format = fmt
    tmp = f"{target}.surepoint-partial"
    try:
        explorer.export(item, tmp, where=where, fmt=fmt, sink=ExportSink(started, result))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def record(catalog: Catalog, repository: Repository, point: RestorePoint, outcome: str, message: str) -> None:
    with contextlib.suppress(Exception):
        EventRecorder(catalog, repository.id, point.id, point.name)("explore", "export", outcome, message)
