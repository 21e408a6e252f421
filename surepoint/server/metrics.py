"""Prometheus text exposition of the server's figures: last success per system and job, bytes and
durations of the last session per job, session counts by state, repository sizes."""

from __future__ import annotations

from surepoint.server.db import Database, parse_iso
from surepoint.server.repositories import Repositories


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, labels: dict, value: float) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value:g}" if inner else f"{name} {value:g}"


def render(db: Database, repositories: Repositories, repository_names: list[str]) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(name, labels, value) for labels, value in samples)

    systems = repositories.systems()
    metric(
        "surepoint_restore_point_last_good_timestamp_seconds",
        "gauge",
        "Creation time of the newest restore point that is not damaged or failed, per system.",
        [
            ({"repository": s["repository"], "name": s["name"]}, parse_iso(s["last_good"]["created"]).timestamp())
            for s in systems
            if s["last_good"]
        ],
    )
    metric(
        "surepoint_restore_points",
        "gauge",
        "Restore points per system.",
        [({"repository": s["repository"], "name": s["name"]}, s["points"]) for s in systems],
    )
    sizes = []
    for name in repository_names:
        info = repositories.info(name)
        if "stored_bytes" in info:
            sizes.append(({"repository": name}, info["stored_bytes"]))
    metric("surepoint_repository_stored_bytes", "gauge", "Bytes the repository takes in its storage.", sizes)
    last = db.query(
        "SELECT s.job_name, s.state, s.started, s.ended, s.bytes_read, s.bytes_stored FROM sessions s "
        "WHERE s.id IN (SELECT MAX(id) FROM sessions WHERE ended IS NOT NULL AND job_id IS NOT NULL GROUP BY job_id)"
    )
    success = db.query(
        "SELECT job_name, MAX(ended) AS ended FROM sessions WHERE state IN ('success', 'warning') "
        "AND job_id IS NOT NULL GROUP BY job_name"
    )
    metric(
        "surepoint_job_last_success_timestamp_seconds",
        "gauge",
        "End of the newest successful session per job.",
        [({"job": r["job_name"]}, parse_iso(r["ended"]).timestamp()) for r in success],
    )
    metric(
        "surepoint_job_last_duration_seconds",
        "gauge",
        "Duration of the newest finished session per job.",
        [
            (
                {"job": r["job_name"], "state": r["state"]},
                (parse_iso(r["ended"]) - parse_iso(r["started"])).total_seconds(),
            )
            for r in last
            if r["started"] and r["ended"]
        ],
    )
    metric(
        "surepoint_job_last_read_bytes",
        "gauge",
        "Bytes read by the newest finished session per job.",
        [({"job": r["job_name"]}, r["bytes_read"]) for r in last],
    )
    metric(
        "surepoint_job_last_stored_bytes",
        "gauge",
        "New bytes stored by the newest finished session per job.",
        [({"job": r["job_name"]}, r["bytes_stored"]) for r in last],
    )
    counts = db.query("SELECT state, COUNT(*) AS n FROM sessions GROUP BY state")
    metric(
        "surepoint_sessions",
        "gauge",
        "Sessions kept, by state.",
        [({"state": r["state"]}, int(r["n"])) for r in counts],
    )
    return "\n".join(out) + "\n"
