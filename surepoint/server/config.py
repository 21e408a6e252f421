"""The server's configuration file (TOML): where it listens, where it keeps its state, the
repositories it may use, limits, and where notifications go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from surepoint.errors import UsageError
from surepoint.tomlfile import read_toml

DEFAULT_PORT = 8470
DEFAULT_STATE_DIR = "/var/lib/surepoint/server"


@dataclass
class RepositoryConfig:
    """A repository the server's jobs may write to; its passphrase stays in a file, never in the database."""

    name: str
    location: str
    passphrase_file: str | None = None
    catalog: str | None = None  # the repository's event catalog (SQLite); default: in the state directory
    max_parallel: int = 2  # sessions writing to it at once


@dataclass
class NotificationConfig:
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password_file: str | None = None
    mail_from: str = "surepoint@localhost"
    mail_to: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)
    on: list[str] = field(default_factory=lambda: ["failed", "warning"])  # session outcomes that notify
    daily_summary: str | None = None  # "HH:MM" in the server's time zone
    rpo_hours: float = 26.0  # alert: a protected system has no restore point this recent
    unverified_hours: float = 168.0  # alert: a restore point older than this is still unverified


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    state_dir: str = DEFAULT_STATE_DIR
    catalog: str | None = None  # database URL: a SQLite path or postgresql://...; default: state_dir/server.sqlite
    tls_cert: str | None = None
    tls_key: str | None = None
    admin_password_file: str | None = None
    timezone: str = "UTC"
    max_sessions: int = 4  # sessions running at once on this host
    session_retention_days: float = 90.0
    tick_seconds: float = 1.0
    metrics_public: bool = False
    repositories: dict[str, RepositoryConfig] = field(default_factory=dict)
    notifications: NotificationConfig = field(default_factory=NotificationConfig)

    @property
    def database_url(self) -> str:
        return self.catalog or os.path.join(self.state_dir, "server.sqlite")

    def catalog_of(self, repo: RepositoryConfig) -> str:
        """The event catalog (SQLite) of a repository: its own setting, else one in the state directory."""
        return repo.catalog or os.path.join(self.state_dir, "catalogs", f"{repo.name}.sqlite")

    def repository(self, name: str) -> RepositoryConfig:
        try:
            return self.repositories[name]
        except KeyError:
            known = ", ".join(sorted(self.repositories)) or "none configured"
            raise UsageError(f"unknown repository {name!r} (known: {known})") from None


_SERVER_KEYS = {f for f in ServerConfig.__dataclass_fields__ if f not in ("repositories", "notifications")}


def _typed(section: str, data: dict, allowed: dict) -> dict:
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise UsageError(f"server config: unknown key {key!r} in [{section}]")
        expected = allowed[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is not None and not isinstance(value, expected):
            raise UsageError(f"server config: [{section}] {key} must be {expected.__name__}")
        out[name] = value
    return out


def _types(cls) -> dict:
    mapping = {"str": str, "int": int, "float": float, "bool": bool, "list[str]": list}
    return {name: mapping.get(str(f.type).replace(" | None", "")) for name, f in cls.__dataclass_fields__.items()}


def parse_config(data: dict, base_dir: str = ".") -> ServerConfig:
    """A ServerConfig from parsed TOML; relative paths are taken from the file's directory."""
    data = dict(data)
    repos = data.pop("repositories", {}) or {}
    notifications = data.pop("notifications", {}) or {}
    server = data.pop("server", {}) or {}
    if data:
        raise UsageError(f"server config: unknown section(s) {', '.join(sorted(data))}")
    types = {k: v for k, v in _types(ServerConfig).items() if k in _SERVER_KEYS}
    config = ServerConfig(**_typed("server", server, types))
    for key in ("state_dir", "tls_cert", "tls_key", "admin_password_file"):
        value = getattr(config, key)
        if value:
            setattr(config, key, os.path.join(base_dir, os.path.expanduser(value)))
    if config.catalog and "://" not in config.catalog:
        config.catalog = os.path.join(base_dir, config.catalog)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise UsageError("server config: give both tls_cert and tls_key, or neither")
    if not 0 < config.port < 65536:
        raise UsageError(f"server config: port {config.port} is out of range")
    if config.max_sessions < 1:
        raise UsageError("server config: max_sessions must be at least 1")
    if not isinstance(repos, dict):
        raise UsageError("server config: [repositories.NAME] tables expected")
    rtypes = _types(RepositoryConfig)
    for name, table in repos.items():
        if not isinstance(table, dict):
            raise UsageError(f"server config: [repositories.{name}] must be a table")
        fields = _typed(f"repositories.{name}", table, {k: v for k, v in rtypes.items() if k != "name"})
        if "location" not in fields:
            raise UsageError(f"server config: [repositories.{name}] needs a location")
        repo = RepositoryConfig(name=name, **fields)
        if "://" not in repo.location:
            repo.location = os.path.join(base_dir, repo.location)
        for key in ("passphrase_file", "catalog"):
            if getattr(repo, key):
                setattr(repo, key, os.path.join(base_dir, getattr(repo, key)))
        config.repositories[name] = repo
    config.notifications = NotificationConfig(**_typed("notifications", notifications, _types(NotificationConfig)))
    if config.notifications.smtp_password_file:
        config.notifications.smtp_password_file = os.path.join(base_dir, config.notifications.smtp_password_file)
    return config


def load_config(path: str) -> ServerConfig:
    return parse_config(read_toml(path, "server config"), os.path.dirname(os.path.abspath(path)))
