"""The mount tests' CLI fixture (own mount state directory, nothing left mounted) for the scan tests."""

from tests.mount.conftest import mcli  # noqa: F401
