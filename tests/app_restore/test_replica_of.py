"""`--replica-of` for MariaDB: what is accepted, and nothing of a password file on a command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.consistency.restore import TargetInUse
from surepoint.consistency.restore_mariadb import parse_primary


def test_parse_primary(tmp_path: Path) -> None:
    assert parse_primary("host=10.0.0.5 user=repl") == {"host": "10.0.0.5", "user": "repl"}
    secret = tmp_path / "pass"
    secret.write_text("s3cret\nignored\n")
    parsed = parse_primary(f"host=db port=3307 user=repl password_file={secret}")
    assert parsed == {"host": "db", "port": "3307", "user": "repl", "password": "s3cret"}
    for bad, said in (
        ("host=db", "needs at least host"),
        ("user=repl", "needs at least host"),
        ("host=db user=r port=x", "not a number"),
        ("host=db user=r ssl=1", "is not host="),
        ("host=db user=r dbname", "is not host="),
    ):
        with pytest.raises(TargetInUse, match=said):
            parse_primary(bad)
