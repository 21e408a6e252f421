"""The conformance suite of the storage contract (surepoint/storage/backend.py): every backend runs it.

To run it against a backend, subclass `BackendSuite` in a test module and give it a `backend`
fixture that yields a fresh, empty backend (and closes it afterwards):

    from tests.storage.suite import BackendSuite

    class TestS3Backend(BackendSuite):
        @pytest.fixture
        def backend(self, s3_env, s3_bucket):
            b = S3Backend.open(f"s3://{s3_bucket}/repo", create=True)
            yield b
            b.close()

Optionally override `age(backend, name, seconds)` to make an object look older without waiting
(the local and memory backends do; otherwise the mtime tests wait a little over a second, the
resolution of S3's LastModified), and `reopen(backend)` if `storage.open(backend.location)`
cannot reach the same objects (the memory backend). Tests that depend on a capability skip
where `backend.capabilities` says the backend does not have it.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from surepoint import errors, storage
from surepoint.storage.backend import Backend, Capabilities, ObjectInfo, ObjectNotFound

MiB = 1 << 20


def names(infos) -> list[str]:
    return sorted(info.name for info in infos)


class BackendSuite:
    """Every rule of the contract, as tests; a subclass provides the `backend` fixture."""

    # hooks a backend's test module may override --------------------------------------------------

    def age(self, backend: Backend, name: str, seconds: float) -> bool:
        """Make `name` look `seconds` older; False if the backend cannot (the test waits instead)."""
        return False

    def reopen(self, backend: Backend) -> Backend:
        return storage.open(backend.location)

    # shape of the backend ---------------------------------------------------------------------

    def test_is_a_backend_with_capabilities(self, backend):
        assert isinstance(backend, Backend)
        assert isinstance(backend.capabilities, Capabilities)
        assert isinstance(backend.location, str) and backend.location
        assert list(backend.list("")) == []

    # reading and writing ----------------------------------------------------------------------

    def test_put_get_round_trip(self, backend):
        blobs = {
            "config": b'{"format": "x"}',
            "empty": b"",
            "binary/all-bytes": bytes(range(256)) * 3,
            "chunks/ab/ab" + "0" * 62: os.urandom(3 * MiB + 17),
        }
        for name, data in blobs.items():
            backend.put(name, data)
        for name, data in blobs.items():
            assert backend.get(name) == data
            assert backend.exists(name)
            assert backend.stat(name).size == len(data)

    def test_put_replaces_an_existing_object(self, backend):
        backend.put("config", b"old contents, longer than the new")
        backend.put("config", b"new")
        assert backend.get("config") == b"new"
        assert backend.stat("config").size == 3
        assert names(backend.list("")) == ["config"]

    def test_deferred_puts_are_readable_and_sync_keeps_them(self, backend):
        for i in range(20):
            backend.put(f"indexes/p{i:02d}", f"index {i}".encode(), durable=False)
        backend.sync()
        backend.put("restorepoints/p", b"manifest", durable=True)
        for i in range(20):
            assert backend.get(f"indexes/p{i:02d}") == f"index {i}".encode()
        backend.sync()  # a second sync with nothing pending is harmless
        assert len(names(backend.list("indexes/"))) == 20

    def test_reopened_backend_sees_durable_objects(self, backend):
        backend.put("config", b"settings")
        backend.put("chunks/00/00aa", b"chunk", durable=False)
        backend.sync()
        other = self.reopen(backend)
        try:
            assert other.get("config") == b"settings"
            assert other.get("chunks/00/00aa") == b"chunk"
        finally:
            if other is not backend:
                other.close()

    def test_put_is_atomic_for_readers(self, backend):
        first, second = b"a" * (2 * MiB), b"b" * (2 * MiB + 1)
        backend.put("locks/x", first)
        seen: list[bytes] = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                seen.append(backend.get("locks/x"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(6):
                backend.put("locks/x", second if i % 2 == 0 else first)
        finally:
            stop.set()
            reader.join()
        assert seen and all(data in (first, second) for data in seen)

    def test_parallel_puts_of_many_objects(self, backend):
        def write(worker: int) -> None:
            for i in range(25):
                backend.put(f"chunks/{worker:02x}/{worker:02x}{i:04d}", bytes([worker]) * (i + 1), durable=False)
            # the same chunk written by every worker: identical bytes, one object
            backend.put("chunks/ff/shared", b"same content", durable=False)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        backend.sync()
        listed = names(backend.list("chunks/"))
        assert len(listed) == 4 * 25 + 1
        assert backend.get("chunks/02/020007") == bytes([2]) * 8
        assert backend.get("chunks/ff/shared") == b"same content"

    # not found ----------------------------------------------------------------------------------

    def test_one_not_found_error(self, backend):
        assert ObjectNotFound is errors.ObjectNotFound
        for operation in (
            lambda: backend.get("chunks/00/nothing"),
            lambda: backend.stat("chunks/00/nothing"),
            lambda: backend.delete("chunks/00/nothing"),
            lambda: backend.rename("chunks/00/nothing", "trash/nothing"),
        ):
            with pytest.raises(ObjectNotFound):
                operation()
        assert backend.exists("chunks/00/nothing") is False
        assert backend.touch("chunks/00/nothing") is False
        assert not backend.exists("trash/nothing")

    def test_delete(self, backend):
        backend.put("locks/a", b"1")
        backend.put("locks/b", b"2")
        backend.delete("locks/a")
        assert not backend.exists("locks/a")
        assert names(backend.list("locks/")) == ["locks/b"]
        with pytest.raises(ObjectNotFound):
            backend.get("locks/a")
        with pytest.raises(ObjectNotFound):
            backend.delete("locks/a")

    # listing ------------------------------------------------------------------------------------

    def test_list_by_prefix(self, backend):
        objects = ["config", "chunks/ab/ab01", "chunks/ab/ab02", "chunks/cd/cd01", "indexes/p.0", "locks/l1"]
        for name in objects:
            backend.put(name, name.encode())
        assert names(backend.list("")) == sorted(objects)
        assert names(backend.list("chunks/")) == ["chunks/ab/ab01", "chunks/ab/ab02", "chunks/cd/cd01"]
        assert names(backend.list("chunks/ab/")) == ["chunks/ab/ab01", "chunks/ab/ab02"]
        assert names(backend.list("chunks/c")) == ["chunks/cd/cd01"]
        assert names(backend.list("restorepoints/")) == []
        infos = {info.name: info for info in backend.list("")}
        assert all(isinstance(info, ObjectInfo) for info in infos.values())
        assert infos["chunks/ab/ab01"].size == len(b"chunks/ab/ab01")

    def test_list_never_shows_temporaries(self, backend):
        for i in range(10):
            backend.put(f"chunks/0{i}/0{i}", b"x" * 1000, durable=False)
        backend.sync()
        assert all("tmp" not in name for name in names(backend.list("")))
        assert list(backend.list_temporary()) == []  # a finished write leaves nothing behind

    def test_prepare_makes_prefixes_ready(self, backend):
        prefixes = ["indexes/", "restorepoints/", "locks/", "trash/"] + [f"chunks/{b:02x}/" for b in range(256)]
        backend.prepare(prefixes)
        assert list(backend.list("")) == []
        backend.put("chunks/7f/7f01", b"x", durable=True)
        backend.put("restorepoints/p", b"m", durable=True)
        assert names(backend.list("")) == ["chunks/7f/7f01", "restorepoints/p"]

    # times --------------------------------------------------------------------------------------

    def _make_old(self, backend: Backend, name: str) -> float:
        """Age an object by an hour if the backend can, else wait past the mtime resolution."""
        if not self.age(backend, name, 3600):
            time.sleep(1.1)
        return backend.stat(name).mtime

    def test_mtime_is_recent(self, backend):
        before = time.time()
        backend.put("chunks/00/0001", b"data")
        mtime = backend.stat("chunks/00/0001").mtime
        assert before - 120 <= mtime <= time.time() + 120  # a remote store's clock may differ a little
        listed = next(iter(backend.list("chunks/00/")))
        assert abs(listed.mtime - mtime) < 2

    def test_touch_renews_mtime(self, backend):
        if not backend.capabilities.touch_renews_mtime:
            pytest.skip("this backend's touch does not renew mtime")
        backend.put("chunks/00/0001", b"data")
        old = self._make_old(backend, "chunks/00/0001")
        assert backend.touch("chunks/00/0001") is True
        assert backend.stat("chunks/00/0001").mtime > old
        assert next(iter(backend.list("chunks/00/"))).mtime > old
        assert backend.get("chunks/00/0001") == b"data"

    def test_put_again_renews_mtime(self, backend):
        backend.put("chunks/00/0001", b"data")
        old = self._make_old(backend, "chunks/00/0001")
        backend.put("chunks/00/0001", b"data", durable=False)
        backend.sync()
        assert backend.stat("chunks/00/0001").mtime > old

    # rename -------------------------------------------------------------------------------------

    def test_rename(self, backend):
        backend.put("chunks/ab/ab01", b"payload")
        backend.rename("chunks/ab/ab01", "trash/ab01")
        assert not backend.exists("chunks/ab/ab01")
        assert backend.get("trash/ab01") == b"payload"
        assert names(backend.list("")) == ["trash/ab01"]
        backend.put("chunks/ab/ab01", b"newer")
        backend.rename("trash/ab01", "chunks/ab/ab01")  # replaces the destination
        assert backend.get("chunks/ab/ab01") == b"payload"
        assert names(backend.list("")) == ["chunks/ab/ab01"]
        backend.sync()
