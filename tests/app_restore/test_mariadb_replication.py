"""A MariaDB primary and its GTID replica on 127.0.0.1: restoring either one never leaves them diverged.

Non-authoritative: the replica is lost; it comes back from the primary's restore point as a replica
(`--replica-of`), from the GTID position of the point, and catches up. Authoritative: the primary
comes back from the point with a new server identity and GTID domain; its old replica, ahead of it,
is refused (error 1236) instead of silently following, keeps its rows, and is named for re-sync;
re-synced by a restore as a replica. CHECKSUM TABLE of every table is the same on both afterwards.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.consistency.helpers import MariaDB, chown, maria_job, sh

from .test_restore_app import assert_phases_in_order, restore_events

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"),
]

PASSWORD = "repl-secret"


def checksums(socket) -> dict[str, str]:
    """CHECKSUM TABLE of every table of the app schema."""
    argv = ["mariadb", "--batch", "--skip-column-names", f"--socket={socket}", "-uroot"]
    tables = sh([*argv, "-e", "SHOW TABLES FROM app"]).stdout.split()
    out = sh([*argv, "-e", "CHECKSUM TABLE " + ", ".join(f"app.{t}" for t in tables)]).stdout
    return dict(line.split("\t") for line in out.splitlines())


def count(socket) -> int:
    argv = ["mariadb", "--batch", "--skip-column-names", f"--socket={socket}", "-uroot"]
    return int(sh([*argv, "-e", "SELECT count(*) FROM app.ticks"]).stdout)


def slave_status(socket) -> dict[str, str]:
    out = sh(["mariadb", f"--socket={socket}", "-uroot", "--vertical", "-e", "SHOW SLAVE STATUS"]).stdout
    return {k.strip(): v.strip() for k, sep, v in (line.partition(": ") for line in out.splitlines()) if sep}


def caught_up(primary: MariaDB, socket, timeout: float = 60) -> dict[str, str]:
    """Wait until the replica has applied everything the primary wrote; return its checksums."""
    position = primary.sql("SELECT @@gtid_binlog_pos")[0][0]
    argv = ["mariadb", "--batch", "--skip-column-names", f"--socket={socket}", "-uroot"]
    waited = sh([*argv, "-e", f"SELECT MASTER_GTID_WAIT('{position}', {timeout})"], timeout=timeout + 30).stdout
    assert waited.strip() == "0", f"the replica did not reach {position}: {slave_status(socket)}"
    return checksums(socket)


def insert(server: MariaDB, rows: int, tag: str) -> None:
    server.sql(f"INSERT INTO app.ticks(v) SELECT '{tag}' FROM seq_1_to_{rows}", "app")


def test_mariadb_pair_restores_without_divergence(work, maria, repo):
    cli = repo
    primary = maria
    primary.sql(
        f"CREATE USER repl@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'"
    )
    replica_dir = work.dir / "replica"
    replica = MariaDB(work, replica_dir, tag="replica")
    replica.install()
    replica.start(server_id=2)
    replica.sql(
        f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, MASTER_USER='repl', "
        f"MASTER_PASSWORD='{PASSWORD}', MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; START SLAVE"
    )
    insert(primary, 400, "before")
    assert caught_up(primary, replica.socket) == checksums(primary.socket)
    point = cli.run("backup", "--job", str(maria_job(work, primary)), "--json", check=True).json()
    insert(primary, 100, "after")
    assert caught_up(primary, replica.socket) == checksums(primary.socket)
    primary_via = f"host=127.0.0.1 port={primary.port} user=repl password_file={work.dir / 'repl.pass'}"
    (work.dir / "repl.pass").write_text(PASSWORD + "\n")
    os.chmod(work.dir / "repl.pass", 0o600)

    # Non-authoritative: the replica is lost; it comes back from the primary's point as a replica and catches up.
    replica.stop()
    chown(replica_dir, "mysql")
    result = cli.run(
        "restore-app", "mariadb", "mariadb", "--to", str(replica_dir), "--overwrite", "--socket", str(replica.socket),
        "--port", str(replica.port), "--replica-of", primary_via, "--json", check=True,
    ).json()  # fmt: skip
    work.defer(lambda: sh(["mariadb-admin", f"--socket={replica.socket}", "-uroot", "shutdown"], check=False))
    assert result["details"]["replica_of"] == f"127.0.0.1:{primary.port}"
    assert PASSWORD not in str(result) and all(
        PASSWORD not in e["message"] for e in restore_events(cli, point["id"], "mariadb")
    )
    insert(primary, 50, "later")
    primary_sums = checksums(primary.socket)
    assert caught_up(primary, replica.socket) == primary_sums
    assert count(primary.socket) == count(replica.socket) == 550

    # Authoritative: the primary comes back from the point (400 rows) with a new identity.
    result = cli.run(
        "restore-app", "mariadb", "mariadb", "--to", str(primary.datadir), "--overwrite", "--socket",
        str(primary.socket), "--port", str(primary.port), "--json", check=True,
    ).json()  # fmt: skip
    primary.proc = None  # stopped by the restore; the restored server is restore-app's
    work.defer(lambda: sh(["mariadb-admin", f"--socket={primary.socket}", "-uroot", "shutdown"], check=False))
    evs = restore_events(cli, point["id"], "mariadb")
    assert_phases_in_order(evs, "mariadb")
    assert result["details"]["replicas_to_resync"] == ["repl@127.0.0.1"], result["details"]
    assert "must be re-synced" in evs[1]["message"] and "new server identity" in evs[3]["message"]
    domain = result["details"]["gtid_domain_id"]
    assert domain >= 1
    assert count(primary.socket) == 400
    insert(primary, 10, "new")
    # The old replica (550 rows) is refused: it stops, keeps its rows, never takes the new ones.
    deadline = time.monotonic() + 60
    while slave_status(replica.socket).get("Last_IO_Errno") != "1236":
        assert time.monotonic() < deadline, f"the old replica was not refused: {slave_status(replica.socket)}"
        time.sleep(0.5)
    refusal = slave_status(replica.socket)["Last_IO_Error"]
    print(f"\n[mariadb pair] the old replica is refused by the restored primary: {refusal}")
    assert checksums(replica.socket) == primary_sums and count(replica.socket) == 550
    # what the restored primary writes now is in its new domain
    assert str(domain) in {g.split("-")[0] for g in primary.sql("SELECT @@gtid_binlog_pos")[0][0].split(",")}

    # Re-sync: the replica restored from the same point as a replica of the restored primary.
    sh(["mariadb-admin", f"--socket={replica.socket}", "-uroot", "shutdown"])
    cli.run("restore-app", "mariadb", "mariadb", "--to", str(replica_dir), "--overwrite", "--socket",
            str(replica.socket), "--port", str(replica.port), "--replica-of", primary_via, check=True)  # fmt: skip
    final = checksums(primary.socket)
    assert count(primary.socket) == 410
    assert caught_up(primary, replica.socket) == final
    assert count(replica.socket) == 410
    print(f"\n[mariadb pair] primary and replica agree after both restores: {final}")
