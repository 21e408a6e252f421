"""Storage backends: named objects in a flat namespace (local directory now, S3 later)."""

from surepoint.storage.backend import Backend, ObjectInfo, ObjectNotFound
from surepoint.storage.local import LocalBackend

__all__ = ["Backend", "ObjectInfo", "ObjectNotFound", "LocalBackend"]
