"""The one time-stamp format of repositories and catalogs: UTC, ISO 8601, microseconds, a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime

FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_utc(when: datetime) -> str:
    """`when` (aware; a naive time is taken as local time) as 2026-01-31T12:00:00.000000Z."""
    if when.tzinfo is None:
        when = when.astimezone()
    return when.astimezone(UTC).strftime(FORMAT)


def utc_now() -> str:
    """Now, as stored in manifests, events and verification records."""
    return datetime.now(UTC).strftime(FORMAT)


def parse_utc(text: str) -> datetime:
    """An aware datetime from a stored time stamp (with `Z` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
