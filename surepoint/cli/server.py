"""`surepoint server` (the backup server in the foreground) and the client commands that talk to
a running server: `surepoint jobs list/run/show`, `surepoint sessions list/show/log/cancel`.

The client commands take `--server URL` (or SUREPOINT_SERVER) and an API token from
SUREPOINT_TOKEN. No `from __future__ import annotations` here: typer evaluates the annotations.
"""

import os
import sys
import time
from typing import Annotated

import typer

from surepoint.cli.common import JsonOption, err, out, print_json
from surepoint.errors import SurepointError, UsageError

ServerOption = Annotated[
    str | None,
    typer.Option("--server", envvar="SUREPOINT_SERVER", help="URL of a surepoint server (e.g. http://127.0.0.1:8470)."),
]


class ServerUnreachable(SurepointError):
    """The server did not answer, or answered with an error."""


class Client:
    """A small client of the server's REST API (token from SUREPOINT_TOKEN)."""

    def __init__(self, url: str | None, ctx: typer.Context | None = None) -> None:
        url = url or getattr(getattr(ctx, "obj", None), "server_url", None)
        if not url:
            raise UsageError("no server given: pass --server URL or set SUREPOINT_SERVER")
        token = os.environ.get("SUREPOINT_TOKEN", "").strip()
        if not token:
            raise UsageError("set SUREPOINT_TOKEN to an API token of the server (create one in its console or API)")
        import httpx

        self._http = httpx.Client(
            base_url=url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            verify=os.environ.get("SUREPOINT_SERVER_CA") or True,
        )
        self.url = url

    def call(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"server {self.url} did not answer: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:300]
            error = UsageError if response.status_code in (400, 404, 409, 422) else ServerUnreachable
            raise error(f"server: {detail} (HTTP {response.status_code})")
        return response.json()


def register(app: typer.Typer) -> None:
    """Add `server`, `jobs` and `sessions` to the main app."""
    from rich.table import Table

    @app.command("server")
    def server(
        config: Annotated[str, typer.Option("--config", "-c", help="Server configuration file (TOML).")],
        catalog_url: Annotated[
            str | None,
            typer.Option("--catalog", help="Server database: a SQLite path or postgresql://... (overrides the file)."),
        ] = None,
        listen: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
        port: Annotated[int | None, typer.Option(help="Port.", min=1, max=65535)] = None,
        create_token: Annotated[
            str | None,
            typer.Option("--create-token", help="Print a new API token of --user with this name, and exit."),
        ] = None,
        user: Annotated[str, typer.Option("--user", help="Owner of the token made by --create-token.")] = "admin",
    ) -> None:
        """Run the backup server in the foreground: schedules, sessions, REST API and web console.

        On the first start it creates the user `admin`, with the password from the config's
        admin_password_file or a random one printed once.
        """
        from surepoint.server.app import serve
        from surepoint.server.config import load_config

        settings = load_config(config)
        if catalog_url:
            settings.catalog = catalog_url
        if listen:
            settings.listen = listen
        if port:
            settings.port = port
        if create_token:
            _print_token(settings, user, create_token)
            return

        def say(message: str) -> None:
            err.print(message)

        serve(settings, say=say)

    jobs_app = typer.Typer(help="Jobs of a surepoint server (--server URL, token in SUREPOINT_TOKEN).")
    app.add_typer(jobs_app, name="jobs")

    @jobs_app.command("list")
    def jobs_list(ctx: typer.Context, server_url: ServerOption = None, as_json: JsonOption = False) -> None:
        """List the server's jobs with their schedules and next runs."""
        client = Client(server_url, ctx)
        jobs = client.call("GET", "/jobs")
        if as_json:
            print_json(jobs)
            return
        table = Table(title=f"jobs on {client.url}")
        for col in ("name", "kind", "repository", "schedule", "next run (UTC)", "enabled"):
            table.add_column(col)
        for j in jobs:
            schedule = " ".join(x for x in (j["schedule"] or "", j["timezone"] if j["schedule"] else "") if x)
            if j["after_job"]:
                schedule = (schedule + " after " + j["after_job"]).strip()
            table.add_row(
                j["name"], j["kind"], j["repository"], schedule, (j["next_run"] or "")[:19], str(j["enabled"])
            )
        out.print(table)

    @jobs_app.command("show")
    def jobs_show(
        ctx: typer.Context, job: Annotated[str, typer.Argument(help="Job name or id.")], server_url: ServerOption = None
    ) -> None:
        """Show one job in full (JSON)."""
        print_json(Client(server_url, ctx).call("GET", f"/jobs/{_quote(job)}"))

    @jobs_app.command("run")
    def jobs_run(
        ctx: typer.Context,
        job: Annotated[str, typer.Argument(help="Job name or id.")],
        server_url: ServerOption = None,
        wait: Annotated[bool, typer.Option("--wait", help="Wait for the session and follow its log.")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Start a job now (refused while it is already running); with --wait, exit 1 unless it succeeded."""
        client = Client(server_url, ctx)
        started = client.call("POST", f"/jobs/{_quote(job)}/run")
        if not wait:
            if as_json:
                print_json(started)
            else:
                out.print(f"job {started['job']}: session {started['session']} queued")
            return
        session = _follow(client, started["session"], quiet=as_json)
        if as_json:
            print_json(session)
        if session["state"] not in ("success", "warning"):
            raise typer.Exit(1)

    sessions_app = typer.Typer(help="Sessions of a surepoint server (--server URL, token in SUREPOINT_TOKEN).")
    app.add_typer(sessions_app, name="sessions")

    @sessions_app.command("list")
    def sessions_list(
        ctx: typer.Context,
        server_url: ServerOption = None,
        job: Annotated[str | None, typer.Option(help="Only sessions of this job.")] = None,
        limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
        as_json: JsonOption = False,
    ) -> None:
        """List recent sessions, newest first."""
        params = {"limit": limit, **({"job": job} if job else {})}
        client = Client(server_url, ctx)
        rows = client.call("GET", "/sessions", params=params)
        if as_json:
            print_json(rows)
            return
        table = Table(title=f"sessions on {client.url}")
        for col in ("id", "job", "state", "started (UTC)", "ended", "read", "stored", "message"):
            table.add_column(col)
        for s in rows:
            table.add_row(
                str(s["id"]),
                s["job_name"],
                s["state"],
                (s["started"] or "")[:19],
                (s["ended"] or "")[:19],
                str(s["bytes_read"]),
                str(s["bytes_stored"]),
                s["message"],
            )
        out.print(table)

    @sessions_app.command("show")
    def sessions_show(
        ctx: typer.Context,
        session_id: Annotated[int, typer.Argument(help="Session id.", min=1)],
        server_url: ServerOption = None,
        log: Annotated[bool, typer.Option("--log", help="Also print its log.")] = False,
    ) -> None:
        """Show a session (JSON), and with --log its log lines."""
        client = Client(server_url, ctx)
        print_json(client.call("GET", f"/sessions/{session_id}"))
        if log:
            for line in client.call("GET", f"/sessions/{session_id}/log", params={"limit": 10000})["lines"]:
                out.print(f"{line['time'][:19]} {line['line']}")

    @sessions_app.command("cancel")
    def sessions_cancel(
        ctx: typer.Context,
        session_id: Annotated[int, typer.Argument(help="Session id.", min=1)],
        server_url: ServerOption = None,
    ) -> None:
        """Cancel a queued or running session."""
        result = Client(server_url, ctx).call("POST", f"/sessions/{session_id}/cancel")
        out.print(f"session {session_id}: {result['state']}")

    def _follow(client: Client, session_id: int, quiet: bool) -> dict:
        after = 0
        while True:
            data = client.call("GET", f"/sessions/{session_id}/log", params={"after": after})
            for line in data["lines"]:
                after = line["id"]
                if not quiet:
                    err.print(line["line"])
            if data["state"] not in ("queued", "starting", "running"):
                session = client.call("GET", f"/sessions/{session_id}")
                if not quiet:
                    out.print(f"session {session_id}: {session['state']} {session['message']}".rstrip())
                return session
            time.sleep(1)


def _print_token(settings, user: str, name: str) -> None:
    from surepoint.server import auth
    from surepoint.server.db import open_database

    db = open_database(settings.database_url)
    try:
        row = db.one("SELECT id, name, role FROM users WHERE name = ?", (user,))
        if row is None:
            raise UsageError(f"no user {user!r} in the server database (start the server once to create admin)")
        _token_id, token = auth.create_token(db, auth.User(row["id"], row["name"], row["role"]), name)
        auth.audit(db, user, "create token (command line)", name)
    finally:
        db.close()
    sys.stdout.write(token + "\n")


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
