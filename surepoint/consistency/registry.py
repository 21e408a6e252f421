"""Build writers from job configuration."""

from __future__ import annotations

from surepoint.consistency.fsfreeze import FilesystemFreezeWriter
from surepoint.consistency.mariadb import MariaDBWriter
from surepoint.consistency.postgresql import PostgresWriter
from surepoint.consistency.runner import CommandRunner
from surepoint.consistency.scripts import ScriptWriter
from surepoint.consistency.sqlite import SqliteWriter
from surepoint.consistency.writer import Writer

WRITERS: dict[str, type[Writer]] = {
    "fsfreeze": FilesystemFreezeWriter,
    "postgresql": PostgresWriter,
    "mariadb": MariaDBWriter,
    "sqlite": SqliteWriter,
    "script": ScriptWriter,
}


def build_writers(configs: list[dict], runner: CommandRunner) -> list[Writer]:
    writers = []
    for config in configs:
        settings = {k: v for k, v in config.items() if k != "type"}
        writers.append(WRITERS[config["type"]](runner, settings))
    return writers
