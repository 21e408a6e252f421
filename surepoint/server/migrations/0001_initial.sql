-- The server's state: users and credentials, jobs, sessions and their logs, the audit trail.
-- {id} is the dialect's auto-increment primary key.
CREATE TABLE users (
    id {id},
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE api_tokens (
    id {id},
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    last_used TEXT
);
CREATE TABLE web_sessions (
    id TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL
);
CREATE TABLE jobs (
    id {id},
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    repository TEXT NOT NULL,
    spec TEXT NOT NULL,
    schedule TEXT,
    timezone TEXT NOT NULL DEFAULT 'UTC',
    after_job BIGINT REFERENCES jobs(id) ON DELETE SET NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    retries INTEGER NOT NULL DEFAULT 0,
    retry_delay INTEGER NOT NULL DEFAULT 300,
    notify TEXT,
    next_run TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE sessions (
    id {id},
    job_id BIGINT REFERENCES jobs(id) ON DELETE SET NULL,
    job_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    repository TEXT NOT NULL,
    spec TEXT NOT NULL,
    trigger TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    not_before TEXT,
    queued TEXT NOT NULL,
    started TEXT,
    ended TEXT,
    pid INTEGER,
    pid_start BIGINT,
    host TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    message TEXT NOT NULL DEFAULT '',
    result TEXT,
    bytes_read BIGINT NOT NULL DEFAULT 0,
    bytes_stored BIGINT NOT NULL DEFAULT 0,
    consistency TEXT,
    created_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sessions_by_job ON sessions(job_id, state);
CREATE INDEX sessions_by_state ON sessions(state);
CREATE TABLE session_log (
    id {id},
    session_id BIGINT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    time TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX session_log_by_session ON session_log(session_id, id);
CREATE TABLE audit (
    id {id},
    time TEXT NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}',
    remote TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT 'ok'
);
CREATE TABLE notices (
    key TEXT PRIMARY KEY,
    time TEXT NOT NULL
);
