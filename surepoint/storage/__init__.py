"""Storage backends: named objects in a flat namespace (the contract is in backend.py).

`open(location)` picks the backend by the location's scheme. A plain path is a local directory.
To add a scheme, add one line to SCHEMES naming a callable `opener(location, *, create) -> Backend`
as "module:name" (name may be dotted, e.g. a classmethod). The module is imported only when a
location of that scheme is opened, so a backend's libraries (boto3...) cost the others nothing.
"""

from __future__ import annotations

import importlib
import re

from surepoint.errors import UnsupportedLocation
from surepoint.storage.backend import Backend, Capabilities, ObjectInfo, ObjectNotFound, TemporaryInfo

__all__ = ["Backend", "Capabilities", "ObjectInfo", "ObjectNotFound", "TemporaryInfo", "SCHEMES", "open", "scheme_of"]

SCHEMES: dict[str, str] = {
    "file": "surepoint.storage.local:open_local",
    "s3": "surepoint.storage.s3:S3Backend.open",
    "ssh": "surepoint.storage.ssh:SshBackend",
}

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme_of(location: str) -> str:
    """The scheme of a location: "file" for a plain path."""
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else "file"


def open(location: str, *, create: bool = False) -> Backend:
    """The backend for a repository location; with `create`, the location must be new or empty.

    Raises UnsupportedLocation for a scheme no backend handles, RepositoryNotFound when the
    location does not exist (and `create` is False), RepositoryExists when it holds something
    (and `create` is True).
    """
    scheme = scheme_of(location)
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(SCHEMES))
        raise UnsupportedLocation(f"repository location {location!r}: unknown scheme {scheme}:// (known: {known})")
    module_name, _, attribute = target.partition(":")
    opener = importlib.import_module(module_name)
    for part in attribute.split("."):
        opener = getattr(opener, part)
    return opener(location, create=create)
