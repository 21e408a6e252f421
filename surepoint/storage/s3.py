"""S3 backend: a repository under `s3://bucket/prefix` on AWS S3 or any S3-compatible store.

Connection settings come from where the AWS tools take them: credentials from AWS_ACCESS_KEY_ID
/ AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and ~/.aws), the endpoint from SUREPOINT_S3_ENDPOINT or
AWS_ENDPOINT_URL (AWS itself when neither is set), the region from AWS_REGION /
AWS_DEFAULT_REGION / the profile, else us-east-1.

Its length (over 500 lines) is one contract implemented whole: the Backend methods, the upload
pool that makes them fast and the error mapping that makes them clear belong together.

How the repository's promises hold on S3 (docs/s3.md has the whole story):
- A PUT is atomic and, once it returns, durable and visible to every reader (S3 is strongly
  consistent). A commit is atomic because the restore-point manifest is the single last PUT,
  sent only after every chunk and index upload of the point has finished (`sync()`).
- Puts with durable=False go to a bounded pool of parallel uploads (bounded by bytes in flight);
  `sync()` waits for them and raises the first failure, so nothing refers to an object whose
  upload failed.
- `touch` (a backup reusing a chunk) only checks that the object exists: garbage collection
  without an atomic rename parks a chunk in trash/ and deletes it only after every backup that
  was running then has finished (repo/gc.py), which protects a reused chunk without renewing
  its LastModified (a copy onto itself, billed like a PUT, per chunk and backup).
- Every request is retried with backoff on connection loss, timeouts and 5xx answers until
  SUREPOINT_S3_RETRY_SECONDS (default 60) have passed; wrong credentials, a missing bucket or an
  endpoint that never answers give one clear error.
- Manifests and indexes are cached locally (storage/cache.py).
- On a bucket with Object Lock, `make_immutable(days)` turns on immutability: see s3_lock.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from surepoint.errors import InvalidArgument, ObjectLocked, RepositoryExists, RepositoryNotFound, StorageError
from surepoint.storage.backend import Backend, Capabilities, ObjectInfo, ObjectNotFound
from surepoint.storage.cache import MetadataCache, cacheable
from surepoint.storage.retry import GaveUp, RetryPolicy, call_with_retry

if TYPE_CHECKING:
    from surepoint.storage.s3_lock import ObjectLock

T = TypeVar("T")
SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
DEFAULT_CONNECTIONS = 32
UPLOAD_BYTES_IN_FLIGHT = 256 << 20
CONFIG = "config"
TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ServiceUnavailable",
    "InternalError",
    "OperationAborted",
}
CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}


class S3Error(StorageError):
    """The S3 service refused or failed a request (the message names the endpoint and bucket)."""


class S3CredentialsRefused(S3Error):
    """The endpoint does not accept the credentials (unknown key, wrong secret, expired token)."""


class S3Unreachable(S3Error):
    """The endpoint did not answer (connection refused, timeouts) until the retry deadline."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing '/', may be empty

    @classmethod
    def parse(cls, location: str) -> S3Location:
        if not location.startswith(SCHEME):
            raise InvalidArgument(f"not an S3 location: {location!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = location[len(SCHEME) :].partition("/")
        prefix = prefix.strip("/")
        if not bucket or not 3 <= len(bucket) <= 63:
            raise InvalidArgument(f"S3 location {location!r}: the bucket name must have 3 to 63 characters")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise InvalidArgument(f"S3 location {location!r}: the prefix has an empty, '.' or '..' component")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return f"{self.prefix}/{name}" if self.prefix else name

    def name(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key


@dataclass(frozen=True)
class S3Settings:
    """Where and how to connect; from the environment unless given."""

    endpoint: str | None
    region: str
    connections: int
    retry: RetryPolicy

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        endpoint = env.get("SUREPOINT_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        try:
            connections = int(env.get("SUREPOINT_S3_CONNECTIONS", DEFAULT_CONNECTIONS))
            deadline = float(env.get("SUREPOINT_S3_RETRY_SECONDS", RetryPolicy.deadline))
        except ValueError:
            raise InvalidArgument("SUREPOINT_S3_CONNECTIONS and SUREPOINT_S3_RETRY_SECONDS must be numbers") from None
        return cls(endpoint or None, region or "", max(1, connections), RetryPolicy(deadline=max(0.0, deadline)))


def make_client(settings: S3Settings):
    """A boto3 S3 client: thread-safe, `settings.connections` pooled connections, standard retries."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    region = settings.region or session.region_name or DEFAULT_REGION
    config = Config(
        max_pool_connections=settings.connections,
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if settings.endpoint else {},
        # Stores that predate flexible checksums (older MinIO, SeaweedFS) reject the new headers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=settings.endpoint, region_name=region, config=config)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_transient(exc: BaseException) -> bool:
    """Connection loss, timeouts, throttling and 5xx answers: worth another try."""
    from botocore import exceptions as bex

    if isinstance(
        exc,
        bex.EndpointConnectionError
        | bex.ConnectionClosedError
        | bex.ReadTimeoutError
        | bex.ConnectTimeoutError
        | bex.ResponseStreamingError
        | bex.IncompleteReadError
        | bex.HTTPClientError,
    ):
        return True
    if isinstance(exc, bex.ClientError):
        return _error_code(exc) in TRANSIENT_CODES or _http_status(exc) >= 500
    return False


class _Uploads:
    """Background uploads for durable=False puts: a bounded pool, limited by bytes in flight."""

    def __init__(self, workers: int, budget: int) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        self._budget = budget
        self._in_flight = 0
        self._cond = threading.Condition()
        self._pending: dict[str, set[Future]] = {}  # a name may be put again while its first upload runs
        self._error: BaseException | None = None

    def submit(self, name: str, size: int, upload: Callable[[], None]) -> None:
        with self._cond:
            self._raise_failure()
            # One object larger than the whole budget still goes, alone.
            self._cond.wait_for(lambda: self._in_flight == 0 or self._in_flight + size <= self._budget)
            self._in_flight += size
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="s3-upload")
            future = self._pool.submit(upload)
            self._pending.setdefault(name, set()).add(future)
        future.add_done_callback(lambda f: self._done(name, size, f))

    def _done(self, name: str, size: int, future: Future) -> None:
        with self._cond:
            self._in_flight -= size
            same_name = self._pending.get(name, set())
            same_name.discard(future)
            if not same_name:
                self._pending.pop(name, None)
            failure = None if future.cancelled() else future.exception()
            if failure is not None and self._error is None:
                self._error = failure
                # The job fails at its next put or sync: uploads not yet started need not wait their turn.
                for others in list(self._pending.values()):
                    for other in list(others):
                        other.cancel()
            self._cond.notify_all()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait_for(self, name: str) -> None:
        """If `name` is being uploaded, wait until it is done (a read after our own write sees it)."""
        with self._cond:
            self._cond.wait_for(lambda: name not in self._pending)

    def drain(self) -> None:
        """Wait for every upload; raise the first failure."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending)
            self._raise_failure()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class S3Backend(Backend):
    """Objects as S3 keys under `prefix/` in one bucket."""

    # S3 has no rename (copy, then delete); touch only checks that the object is there.
    capabilities = Capabilities(atomic_rename=False, touch_renews_mtime=False)

    def __init__(self, location: str, *, settings: S3Settings | None = None, client=None) -> None:
        self.where = S3Location.parse(location)
        self.location = str(self.where)
        self.settings = settings or S3Settings.from_environment()
        self.client = client or make_client(self.settings)
        self.bucket = self.where.bucket
        # Parallel requests worth making (the engine sizes its worker pools by it); uploads have their own pool.
        self.concurrency = min(16, self.settings.connections)
        self._uploads = _Uploads(self.settings.connections, UPLOAD_BYTES_IN_FLIGHT)
        self._cache: MetadataCache | None = None
        self.object_lock: ObjectLock | None = None

    def after_fork(self) -> None:
        # The parent's HTTP connections and upload threads are not ours: a client and a pool of our own.
        self.client = make_client(self.settings)
        self._uploads = _Uploads(self.settings.connections, UPLOAD_BYTES_IN_FLIGHT)

    # opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, location: str, *, create: bool = False, **kwargs) -> S3Backend:
        """Connect and check the bucket (and, to create, that the prefix holds nothing yet)."""
        backend = cls(location, **kwargs)
        backend._probe(create)
        return backend

    def _probe(self, create: bool) -> None:
        listing = self._call(
            "list",
            self.location,
            lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir_prefix(), MaxKeys=2),
        )
        if create and listing.get("KeyCount", 0):
            raise RepositoryExists(f"{self.location} is not empty: choose a new bucket or prefix")
        from surepoint.storage.s3_lock import ObjectLock

        self.object_lock = ObjectLock.detect(self)
        self._lock_capability()

    def _lock_capability(self) -> None:
        if self.object_lock is not None:
            self.capabilities = Capabilities(atomic_rename=False, touch_renews_mtime=False, object_lock=True)

    def _dir_prefix(self) -> str:
        return f"{self.where.prefix}/" if self.where.prefix else ""

    def make_immutable(self, days: int) -> None:
        """Lock every object written from now on for `days` (COMPLIANCE mode); only for a new repository."""
        from surepoint.storage.s3_lock import ObjectLock

        self.object_lock = ObjectLock.enable(self, days)
        self._lock_capability()

    # requests ----------------------------------------------------------------------------------

    def _call(self, operation: str, name: str, call: Callable[[], T]) -> T:
        """Run one request with retries; turn what fails into one clear error."""
        from botocore import exceptions as bex

        try:
            return call_with_retry(call, transient=is_transient, policy=self.settings.retry)
        except GaveUp as gave_up:
            last = gave_up.last
            if isinstance(last, bex.ClientError):
                raise S3Error(
                    f"S3 {self._endpoint_name()} kept failing to {operation} {name} "
                    f"({_error_code(last) or _http_status(last)}) for {gave_up.seconds:.0f}s"
                ) from None
            raise S3Unreachable(
                f"S3 endpoint {self._endpoint_name()} is unreachable ({_connection_problem(last)}); "
                f"gave up after {gave_up.attempts} attempts in {gave_up.seconds:.0f}s"
            ) from None
        except bex.NoCredentialsError:
            raise S3CredentialsRefused(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except bex.ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchBucket":
                raise RepositoryNotFound(
                    f"S3 bucket {self.bucket!r} does not exist at {self._endpoint_name()}"
                ) from None
            if code in CREDENTIAL_CODES:
                raise S3CredentialsRefused(
                    f"S3 {self._endpoint_name()} refused the credentials for bucket {self.bucket!r} ({code}): "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
                ) from None
            raise
        except (bex.BotoCoreError, ValueError) as exc:
            if isinstance(exc, ValueError) and "Invalid endpoint" not in str(exc):
                raise
            raise S3Error(f"S3 {self._endpoint_name()}: {exc}") from None

    def _endpoint_name(self) -> str:
        return self.settings.endpoint or "AWS"

    def _failed(self, exc: BaseException, operation: str, name: str) -> S3Error:
        return S3Error(f"S3 {self._endpoint_name()} refused to {operation} {name} in {self.location}: {_short(exc)}")

    # the Backend interface -------------------------------------------------------------------

    def get(self, name: str) -> bytes:
        self._uploads.wait_for(name)
        cache = self._cache if cacheable(name) else None
        if cache is not None and (data := cache.get(name)) is not None:
            return data
        if self.object_lock is not None and self.object_lock.protects(name):
            data = self.object_lock.get(name)
        else:
            data = self._get_current(name)
        if name == CONFIG:
            self._start_cache(data)
        elif cache is not None:
            cache.put(name, data)
        return data

    def _get_current(self, name: str, version: str | None = None) -> bytes:
        from botocore.exceptions import ClientError

        extra = {"VersionId": version} if version else {}

        def fetch() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self.where.key(name), **extra)["Body"].read()

        try:
            return self._call("read", name, fetch)
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                raise ObjectNotFound(name) from None
            raise self._failed(exc, "read", name) from None

    def _start_cache(self, config: bytes) -> None:
        """The cache is per repository id, which the config names (a plain JSON field)."""
        if self._cache is not None:
            return
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            self._cache = MetadataCache(str(json.loads(config).get("id", "")))

    def put(self, name: str, data: bytes, *, durable: bool = True) -> None:
        if self.object_lock is not None:
            self.object_lock.check_put(name)
        if durable:
            self._put_now(name, data)
        else:
            self._uploads.submit(name, len(data), lambda: self._put_now(name, data))

    def _put_now(self, name: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        extra = self.object_lock.put_arguments(name) if self.object_lock is not None else {}
        try:
            response = self._call(
                "write",
                name,
                lambda: self.client.put_object(Bucket=self.bucket, Key=self.where.key(name), Body=data, **extra),
            )
        except ClientError as exc:
            raise self._failed(exc, "write", name) from None
        if self.object_lock is not None:
            self.object_lock.written(name, response, len(data))
        if self._cache is not None and cacheable(name):
            self._cache.put(name, data)

    def _head(self, name: str, version: str | None = None) -> dict | None:
        from botocore.exceptions import ClientError

        extra = {"VersionId": version} if version else {}
        try:
            return self._call(
                "look up",
                name,
                lambda: self.client.head_object(Bucket=self.bucket, Key=self.where.key(name), **extra),
            )
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES or _http_status(exc) == 404:
                return None
            raise self._failed(exc, "look up", name) from None

    def exists(self, name: str) -> bool:
        self._uploads.wait_for(name)
        if self.object_lock is not None and self.object_lock.protects(name):
            return self.object_lock.original(name) is not None
        return self._head(name) is not None

    def stat(self, name: str) -> ObjectInfo:
        self._uploads.wait_for(name)
        if self.object_lock is not None and self.object_lock.protects(name):
            version = self.object_lock.original(name)
            if version is None:
                raise ObjectNotFound(name)
            return ObjectInfo(name, version.size, version.modified)
        head = self._head(name)
        if head is None:
            raise ObjectNotFound(name)
        return ObjectInfo(name, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, name: str) -> None:
        self._uploads.wait_for(name)
        if self._cache is not None:
            self._cache.discard(name)
        if self.object_lock is not None:
            self.object_lock.delete(name)
            return
        if self._head(name) is None:
            raise ObjectNotFound(name)
        self._delete_key(name)

    def _delete_key(self, name: str, version: str | None = None) -> None:
        from botocore.exceptions import ClientError

        extra = {"VersionId": version} if version else {}
        try:
            self._call(
                "delete",
                name,
                lambda: self.client.delete_object(Bucket=self.bucket, Key=self.where.key(name), **extra),
            )
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                raise ObjectNotFound(name) from None
            raise

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if self.object_lock is not None and self.object_lock.protects(prefix):
            yield from self.object_lock.list(prefix)
            return
        for item in self._list_keys(prefix):
            yield ObjectInfo(self.where.name(item["Key"]), int(item["Size"]), item["LastModified"].timestamp())

    def _list_keys(self, prefix: str) -> Iterator[dict]:
        token = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": self.where.key(prefix) if prefix else self._dir_prefix()}
            if token:
                args["ContinuationToken"] = token
            page = self._call("list", prefix or self.location, lambda args=args: self.client.list_objects_v2(**args))
            yield from page.get("Contents", [])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def touch(self, name: str) -> bool:
        """Whether the object exists (a HEAD); its LastModified stays.

        Renewing LastModified would take a copy of the object onto itself, billed like a PUT, for
        every chunk every incremental backup reuses. Garbage collection does not need it here: without
        an atomic rename it never deletes a chunk before every backup that could have reused it has
        finished (repo/gc.py), so a backup only has to know the chunk is there.
        """
        self._uploads.wait_for(name)
        if self.object_lock is not None and self.object_lock.protects(name):
            return self.object_lock.claim(name)
        return self._head(name) is not None

    def rename(self, name: str, new_name: str) -> None:
        """Copy, then delete: not atomic on S3 (a crash between the two leaves both names)."""
        from botocore.exceptions import ClientError

        self._uploads.wait_for(name)
        try:
            self._call(
                "copy",
                name,
                lambda: self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self.where.key(new_name),
                    CopySource={"Bucket": self.bucket, "Key": self.where.key(name)},
                ),
            )
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES or _http_status(exc) == 404:
                raise ObjectNotFound(name) from None
            raise self._failed(exc, "copy", name) from None
        try:
            self.delete(name)
        except ObjectLocked:
            with contextlib.suppress(ObjectNotFound):
                self.delete(new_name)
            raise

    def locked_until(self, name: str) -> float | None:
        """When the object's Object Lock retention ends (a UNIX time), if it is locked now; else None."""
        if self.object_lock is None:
            return None
        return self.object_lock.locked_until(name)

    def sync(self) -> None:
        """Wait until every upload started with durable=False has finished; raise the first failure."""
        self._uploads.drain()

    def close(self) -> None:
        self._uploads.close()


def _connection_problem(exc: BaseException) -> str:
    from botocore import exceptions as bex

    for kind, text in (
        (bex.EndpointConnectionError, "connection refused"),
        (bex.ConnectionClosedError, "connection closed"),
        (bex.ConnectTimeoutError, "connect timed out"),
        (bex.ReadTimeoutError, "read timed out"),
    ):
        if isinstance(exc, kind):
            return text
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
