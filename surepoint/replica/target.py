"""A --to TARGET of replication: a local directory or ssh://[user@]host[:port]/path."""

from __future__ import annotations

from surepoint.errors import InvalidArgument
from surepoint.replica.protocol import RemoteSite
from surepoint.replica.site import LocalSite, Site


def open_site(target: str) -> Site:
    """The site of a --to TARGET: ssh://[user@]host[:port]/path, or a local directory."""
    if target.startswith("ssh://"):
        return RemoteSite(target)
    if "://" in target:
        raise InvalidArgument(f"{target!r}: a replication target is a directory or ssh://[user@]host[:port]/path")
    return LocalSite(target)
