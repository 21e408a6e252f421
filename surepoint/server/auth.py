"""Users, roles, passwords (argon2), API tokens and console sessions.

Roles, from most to least powerful:
  admin            everything, users and tokens of others included
  operator         jobs (create, change, run, cancel) and every restore action
  restore-operator browse restore points, download files, run restores and lab verifications
  auditor          read everything (sessions, logs, audit trail), change nothing
Secrets are stored only as hashes: argon2 for passwords, SHA-256 for random tokens (which
have 256 bits of entropy, so a slow hash adds nothing).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from surepoint.errors import SurepointError, UsageError
from surepoint.server.db import Database, now_iso, parse_iso

ROLES = ("admin", "operator", "restore-operator", "auditor")
READ = set(ROLES)
RESTORE = {"admin", "operator", "restore-operator"}
OPERATE = {"admin", "operator"}
ADMIN = {"admin"}
SESSION_HOURS = 12
TOKEN_PREFIX = "sp_"

_hasher = PasswordHasher()


@dataclass
class User:
    id: int
    name: str
    role: str
    csrf: str | None = None  # set when authenticated by a console cookie


class AuthError(SurepointError):
    """Credentials missing or wrong."""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not (1 <= len(name) <= 64) or not all(c.isalnum() or c in "._-@" for c in name):
        raise UsageError("a user name is 1-64 letters, digits or . _ - @")
    return name


def check_password(password: str) -> str:
    if len(password) < 12:
        raise UsageError("a password needs at least 12 characters")
    if len(password) > 1024:
        raise UsageError("a password has at most 1024 characters")
    return password


def create_user(db: Database, name: str, password: str, role: str) -> User:
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}: choose {', '.join(ROLES)}")
    check_name(name)
    if db.one("SELECT id FROM users WHERE name = ?", (name,)):
        raise UsageError(f"user {name!r} already exists")
    user_id = db.insert(
        "INSERT INTO users (name, password_hash, role, created) VALUES (?, ?, ?, ?)",
        (name, _hasher.hash(check_password(password)), role, now_iso()),
    )
    return User(user_id, name, role)


def set_password(db: Database, user_id: int, password: str) -> None:
    db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (_hasher.hash(check_password(password)), user_id))


def users(db: Database) -> list[dict]:
    return db.query("SELECT id, name, role, created, disabled FROM users ORDER BY name")


def login(db: Database, name: str, password: str) -> User:
    """The user whose name and password these are; AuthError otherwise (same message either way)."""
    row = db.one("SELECT id, name, role, password_hash, disabled FROM users WHERE name = ?", (name,))
    wrong = AuthError("wrong user name or password")
    if row is None:
        _hasher.hash(password[:1024])  # same cost as a real check: no user-name oracle by timing
        raise wrong
    try:
        _hasher.verify(row["password_hash"], password[:1024])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        raise wrong from None
    if row["disabled"]:
        raise wrong
    if _hasher.check_needs_rehash(row["password_hash"]):
        db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (_hasher.hash(password), row["id"]))
    return User(row["id"], row["name"], row["role"])


def create_token(db: Database, user: User, name: str) -> tuple[int, str]:
    """A new API token for `user`: (id, the token). The token itself is shown once, stored only hashed."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = db.insert(
        "INSERT INTO api_tokens (user_id, name, token_hash, created) VALUES (?, ?, ?, ?)",
        (user.id, name, _token_hash(token), now_iso()),
    )
    return token_id, token


def tokens(db: Database, user: User | None = None) -> list[dict]:
    sql = (
        "SELECT t.id, t.name, u.name AS user, t.created, t.last_used FROM api_tokens t JOIN users u ON u.id = t.user_id"
    )
    if user is None:
        return db.query(sql + " ORDER BY t.id")
    return db.query(sql + " WHERE t.user_id = ? ORDER BY t.id", (user.id,))


def delete_token(db: Database, token_id: int, user: User) -> bool:
    if user.role == "admin":
        return db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,)) > 0
    return db.execute("DELETE FROM api_tokens WHERE id = ? AND user_id = ?", (token_id, user.id)) > 0


def user_by_token(db: Database, token: str) -> User | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = db.one(
        "SELECT u.id, u.name, u.role, u.disabled, t.id AS token_id FROM api_tokens t JOIN users u ON u.id = t.user_id "
        "WHERE t.token_hash = ?",
        (_token_hash(token),),
    )
    if row is None or row["disabled"]:
        return None
    db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now_iso(), row["token_id"]))
    return User(row["id"], row["name"], row["role"])


def open_web_session(db: Database, user: User) -> tuple[str, str]:
    """A console session for `user`: (cookie value, CSRF token)."""
    cookie = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    expires = (datetime.now(UTC) + timedelta(hours=SESSION_HOURS)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    db.execute("DELETE FROM web_sessions WHERE expires < ?", (now_iso(),))
    db.execute(
        "INSERT INTO web_sessions (id, user_id, csrf, created, expires) VALUES (?, ?, ?, ?, ?)",
        (_token_hash(cookie), user.id, csrf, now_iso(), expires),
    )
    return cookie, csrf


def user_by_cookie(db: Database, cookie: str) -> User | None:
    if not cookie or len(cookie) > 200:
        return None
    row = db.one(
        "SELECT u.id, u.name, u.role, u.disabled, s.csrf, s.expires FROM web_sessions s "
        "JOIN users u ON u.id = s.user_id WHERE s.id = ?",
        (_token_hash(cookie),),
    )
    if row is None or row["disabled"] or parse_iso(row["expires"]) < datetime.now(UTC):
        return None
    return User(row["id"], row["name"], row["role"], csrf=row["csrf"])


def close_web_session(db: Database, cookie: str) -> None:
    db.execute("DELETE FROM web_sessions WHERE id = ?", (_token_hash(cookie),))


def ensure_admin(db: Database, password_file: str | None, say) -> None:
    """First start: create the admin user, its password from `password_file` or a random one said once."""
    if db.one("SELECT id FROM users LIMIT 1"):
        return
    if password_file:
        try:
            with open(password_file) as f:
                password = f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the admin password file {password_file}: {exc.strerror}") from None
        create_user(db, "admin", password, "admin")
        say(f"created user admin with the password from {password_file}")
        return
    password = secrets.token_urlsafe(18)
    create_user(db, "admin", password, "admin")
    say(f"created user admin with password: {password}  (shown only now; change it in the console)")


def audit(
    db: Database, user: str, action: str, target: str = "", details: str = "{}", remote: str = "", outcome: str = "ok"
) -> None:
    db.execute(
        "INSERT INTO audit (time, username, action, target, details, remote, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (now_iso(), user, action, target, details, remote, outcome),
    )
