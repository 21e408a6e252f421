"""Find applications a writer can protect: from a job's writer list, or by looking at this host's processes."""

from __future__ import annotations

import os
from dataclasses import asdict

from surepoint.consistency.registry import build_writers
from surepoint.consistency.runner import CommandRunner
from surepoint.processes import command_lines


def identify_configured(configs: list[dict], runner: CommandRunner) -> list[dict]:
    """Run the identify phase of each configured writer (and end its session at once)."""
    results = []
    for config, writer in zip(configs, build_writers(configs, runner), strict=True):
        try:
            comps = writer.identify()
            results.append(
                {
                    "writer": writer.name,
                    "type": config["type"],
                    "status": "found",
                    "components": [asdict(c) for c in comps],
                }
            )
        except Exception as exc:  # noqa: BLE001 - report, do not stop at the first
            results.append(
                {
                    "writer": writer.name,
                    "type": config["type"],
                    "status": "not usable",
                    "message": str(exc),
                    "components": [],
                }
            )
        finally:
            try:
                writer.abort()
            except Exception:  # noqa: BLE001
                pass
    return results


def detect_host_applications(runner: CommandRunner) -> list[dict]:
    """Running PostgreSQL clusters and MariaDB/MySQL servers, with their data directories."""
    found = []
    for _pid, argv in command_lines():
        exe = os.path.basename(argv[0])
        if exe in ("postgres", "postmaster") and "-D" in argv:
            data_dir = argv[argv.index("-D") + 1]
            found.append(
                {
                    "writer": "postgresql",
                    "type": "postgresql",
                    "status": "running",
                    "components": [{"name": "cluster", "kind": "data", "paths": [data_dir]}],
                }
            )
        elif exe in ("mariadbd", "mysqld"):
            datadir = next((a.split("=", 1)[1] for a in argv if a.startswith("--datadir=")), "/var/lib/mysql")
            found.append(
                {
                    "writer": "mariadb",
                    "type": "mariadb",
                    "status": "running",
                    "components": [{"name": "server", "kind": "data", "paths": [datadir]}],
                }
            )
    if not found:
        found.append(
            {
                "writer": "-",
                "type": "-",
                "status": "none found",
                "message": "no PostgreSQL or MariaDB server is running here",
                "components": [],
            }
        )
    return found
