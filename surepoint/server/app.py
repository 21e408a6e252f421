"""The server process: the FastAPI application (API, console, /metrics) around a Service, and
how it is served (uvicorn, 127.0.0.1 unless configured otherwise, TLS with a given certificate)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from surepoint import __version__
from surepoint.errors import SurepointError, UsageError
from surepoint.server import api, console
from surepoint.server.auth import AuthError
from surepoint.server.browse import BrowseError
from surepoint.server.config import ServerConfig
from surepoint.server.kinds import describe_validation
from surepoint.server.scheduler import AlreadyRunning
from surepoint.server.service import Service

MUTATING = ("POST", "PUT", "PATCH", "DELETE")


def _problem(status: int, message: str, request: Request, headers: dict[str, str] | None = None):
    """JSON for the API and /metrics; for the console a login redirect (401) or an error page."""
    if request.url.path.startswith("/api/") or request.url.path in ("/metrics", "/openapi.json"):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else headers
        return JSONResponse({"detail": message}, status_code=status, headers=headers)
    if status == 401:
        return console.login_redirect(request)
    return console.error_page(request, status, message)


def create_app(service: Service, *, start: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if start:
            service.start()
        try:
            yield
        finally:
            if start:
                service.stop()

    app = FastAPI(title="surepoint server", version=__version__, lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def audit_mutations(request: Request, call_next):
        """Every mutating call goes into the audit trail, with who (if known) and how it ended."""
        response = await call_next(request)
        if request.method in MUTATING and not request.url.path.startswith("/static"):
            user = getattr(request.state, "user", None) or "(anonymous)"
            outcome = "ok" if response.status_code < 400 else f"refused {response.status_code}"
            details = getattr(request.state, "audit", None) or {}
            try:
                service.audit(
                    user,
                    f"{request.method} {request.url.path}",
                    request.url.path,
                    details,
                    request.client.host if request.client else "",
                    outcome,
                )
            except Exception:  # noqa: BLE001 - a closed database at shutdown
                pass
        return response

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        return _problem(422, describe_validation(list(exc.errors())), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _problem(exc.status_code, str(exc.detail), request)

    @app.exception_handler(SurepointError)
    async def surepoint_error(request: Request, exc: SurepointError):
        headers = None
        if isinstance(exc, api.HTTPProblem):
            status, headers = exc.status, exc.headers
        elif isinstance(exc, AuthError):
            status = 401
        elif isinstance(exc, AlreadyRunning | BrowseError):
            status = 409
        elif isinstance(exc, UsageError):
            status = 400
        else:
            status = 409
        return _problem(status, str(exc), request, headers)

    app.include_router(api.router)
    app.include_router(api.metrics_router)
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=os.path.join(os.path.dirname(__file__), "static")), name="static")
    return app


class CannotListen(SurepointError):
    """The address is taken or not this host's."""


def _check_address(host: str, port: int) -> None:
    """Fail before anything starts when the server could not listen (uvicorn would say it late, as a log line)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(config: ServerConfig, say: Callable[[str], None] = print) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C."""
    import uvicorn

    _check_address(config.listen, config.port)
    service = Service(config, say=say)
    app = create_app(service)
    scheme = "https" if config.tls_cert else "http"
    say(f"surepoint server on {scheme}://{config.listen}:{config.port}/ (console; API docs at /docs)")
    say(f"state in {config.state_dir}")
    uvicorn.run(
        app,
        host=config.listen,
        port=config.port,
        ssl_certfile=config.tls_cert,
        ssl_keyfile=config.tls_key,
        log_level="warning",
        access_log=False,
    )
