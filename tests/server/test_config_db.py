"""The server's configuration file, its database (SQLite, and PostgreSQL 15 when installed) with
its migrations, schedules in time zones, and HTTPS with a given certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from surepoint.errors import UsageError
from surepoint.server import auth
from surepoint.server.config import load_config, parse_config
from surepoint.server.db import migrations, open_database
from surepoint.server.scheduler import check_schedule, next_run
from tests.server.conftest import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def test_the_shipped_example_config_loads() -> None:
    config = load_config(str(REPO_ROOT / "contrib" / "server.toml"))
    assert config.listen == "127.0.0.1"
    assert config.repositories["main"].passphrase_file == "/etc/surepoint/repo-passphrase"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"server": {"prot": 1}}, "unknown key 'prot' in [server]"),
        ({"server": {"port": "80"}}, "[server] port must be int"),
        ({"server": {"port": 70000}}, "port 70000 is out of range"),
        ({"server": {"tls_cert": "c.pem"}}, "give both tls_cert and tls_key"),
        ({"repositories": {"main": {}}}, "[repositories.main] needs a location"),
        ({"schedule": {}}, "unknown section(s) schedule"),
        ({"notifications": {"mail_to": "ops@x"}}, "[notifications] mail_to must be list"),
    ],
)
def test_config_mistakes_are_one_clear_line(data: dict, message: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_config(data, "/etc/surepoint")
    assert message in str(exc.value)


def test_a_bad_config_file_is_refused_by_the_command(tmp_path: Path) -> None:
    from tests.conftest import SUREPOINT

    (tmp_path / "server.toml").write_text("[server]\nport = 'http'\n")
    proc = subprocess.run(
        [SUREPOINT, "server", "--config", str(tmp_path / "server.toml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: server config: [server] port must be int"


def test_cron_in_a_time_zone_across_daylight_saving() -> None:
    check_schedule("30 2 * * *", "Europe/Berlin")
    # 02:30 Berlin is 00:30 UTC in summer, 01:30 UTC in winter
    summer = next_run("30 2 * * *", "Europe/Berlin", dt.datetime(2026, 7, 1, tzinfo=dt.UTC))
    winter = next_run("30 2 * * *", "Europe/Berlin", dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    assert (summer.hour, summer.minute) == (0, 30)
    assert (winter.hour, winter.minute) == (1, 30)
    seconds = next_run("*/5 * * * * *", "UTC", dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC))
    assert seconds == dt.datetime(2026, 1, 1, 0, 0, 5, tzinfo=dt.UTC)
    for bad in ("61 * * * *", "* * *", "@often"):
        with pytest.raises(UsageError):
            check_schedule(bad, "UTC")


def _exercise(url: str) -> None:
    db = open_database(url)
    try:
        version = max(m[0] for m in migrations())
        assert db.migrate() == version  # again: nothing to do
        user = auth.create_user(db, "op", "operator password", "operator")
        _id, token = auth.create_token(db, user, "ci")
        assert auth.user_by_token(db, token).name == "op"
        job_id = db.insert(
            "INSERT INTO jobs (name, kind, repository, spec, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            ("j", "files", "main", "{}", "t", "t"),
        )
        with db.transaction():
            db.insert(
                "INSERT INTO sessions (job_id, job_name, kind, repository, spec, trigger, state, queued) "
                "VALUES (?, 'j', 'files', 'main', '{}', 'manual', 'queued', 't')",
                (job_id,),
            )
        with pytest.raises(RuntimeError), db.transaction():
            db.execute("UPDATE sessions SET state = 'running'")
            raise RuntimeError("rolled back")
        assert db.one("SELECT state FROM sessions")["state"] == "queued"
        assert db.one("SELECT COUNT(*) AS n FROM schema_migrations")["n"] == len(migrations())
    finally:
        db.close()


def test_sqlite_database(tmp_path: Path) -> None:
    _exercise(str(tmp_path / "state" / "server.sqlite"))
    assert os.stat(tmp_path / "state" / "server.sqlite").st_mode & 0o077 == 0


@pytest.fixture
def postgres():
    missing = [t for t in ("initdb", "pg_ctl") if not (PG_BIN / t).exists()]
    if missing or os.geteuid() != 0:
        pytest.skip("needs root and PostgreSQL 15 (scripts/setup-databases)")
    base = Path(tempfile.mkdtemp(prefix="sp-server-pg-"))
    uid = pwd.getpwnam("postgres").pw_uid
    os.chown(base, uid, -1)
    data = base / "data"
    port = free_port()
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run, PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "--no-instructions"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*run, PG_BIN / "pg_ctl", "-D", data, "-l", base / "log", "-w", "-o",
         f"-p {port} -k {base} -c listen_addresses=''", "start"],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    try:
        yield f"postgresql://postgres@/postgres?host={base}&port={port}"
    finally:
        subprocess.run([*run, PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_postgresql_database(postgres: str) -> None:
    _exercise(postgres)


def test_server_on_postgresql_runs_a_job(postgres: str, tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server")
    server.config.write_text(server.config.read_text().replace("[server]\n", f'[server]\ncatalog = "{postgres}"\n'))
    server.init_repository()
    server.start()
    try:
        image = tmp_path / "disk.img"
        image.write_bytes(os.urandom(1 << 20))
        with server.client() as api:
            job = {"name": "pg", "kind": "files", "repository": "main", "spec": {"paths": [str(image)]}}
            assert api.post("/jobs", json=job).status_code == 201
            session = server.wait_session(api, api.post("/jobs/pg/run").json()["session"])
            assert session["state"] == "success", session
            assert api.get(f"/sessions/{session['id']}/log").json()["lines"]
        assert not (server.base / "state" / "server.sqlite").exists()
    finally:
        server.stop()


def test_https_with_a_given_certificate(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ServerProcess(tmp_path / "server")
    server.config.write_text(
        server.config.read_text().replace(
            "[server]\n", f'[server]\ntls_cert = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"\n'
        )
    )
    server.url = server.url.replace("http://", "https://")
    try:
        server.start()
        response = httpx.get(server.url + "/api/v1/me", verify=str(tmp_path / "cert.pem"))
        assert response.status_code == 401
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/api/v1/me", timeout=5)
        login = httpx.post(
            server.url + "/api/v1/login",
            json={"name": "admin", "password": "admin-password-for-tests"},
            verify=str(tmp_path / "cert.pem"),
        )
        assert "secure" in login.headers["set-cookie"].lower()
    finally:
        server.stop()


def test_start_mistakes_are_one_line(tmp_path: Path) -> None:
    from tests.conftest import SUREPOINT

    server = ServerProcess(tmp_path / "server")

    def run(*extra: str) -> subprocess.CompletedProcess:
        argv = [SUREPOINT, "server", "--config", str(server.config), *extra]
        return subprocess.run(argv, env=server.env, capture_output=True, text=True, timeout=60)

    bad_url = run("--catalog", "mysql://root:secret@db/x")
    assert bad_url.returncode == 2
    assert bad_url.stderr.strip() == (
        "error: unsupported database URL 'mysql://root:***@db/x': give a file path or postgresql://..."
    )
    import socket

    shutil.rmtree(server.base / "state", ignore_errors=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        busy = run()
    assert busy.returncode == 1
    assert busy.stderr.strip() == f"error: cannot listen on 127.0.0.1:{server.port}: Address already in use"
    assert not (server.base / "state").exists()  # nothing started, no admin made
