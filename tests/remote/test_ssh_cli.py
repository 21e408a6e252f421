"""What a user does with ssh:// repositories, through a real sshd: back up, list, restore; append-only holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faultlib import MiB, Repo, make_image, sha256_file

pytestmark = pytest.mark.timeout(300)


def change(path: Path, offset: int, data: bytes) -> str:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return sha256_file(path)


class RemoteRepo(Repo):
    """A Repo whose location is an ssh:// URL, with the client's ssh settings in its environment."""

    def __init__(self, base: Path, url: str, ssh_env: dict[str, str], **kw) -> None:
        super().__init__(base, **kw)
        self.url = url
        self.ssh_env = ssh_env

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(SUREPOINT_REPO=self.url, **self.ssh_env, **extra)


def test_backup_list_restore_over_ssh(sshd, tmp_path: Path):
    server_dir = tmp_path / "server" / "repo"
    repo = RemoteRepo(tmp_path, sshd.url(server_dir), sshd.env())
    repo.init()
    image = tmp_path / "disk.img"
    first = make_image(image, 3 * MiB, seed=21)
    p1 = repo.backup(image, name="web")
    second = change(image, MiB + 7, b"new data" * 64)
    p2 = repo.backup(image, name="web")
    assert p2["disks"][0]["new_chunks"] <= 2  # incremental over ssh too
    assert [p["id"] for p in repo.points()] == [p1["id"], p2["id"]]
    repo.restore_matches(p1["id"], first)
    repo.restore_matches("web:latest", second)
    repo.verify_clean()
    assert (server_dir / "config").is_file()  # the objects live on the server side
    assert len(list((server_dir / "restorepoints").iterdir())) == 2


def test_append_only_client_adds_but_never_removes(sshd, tmp_path: Path):
    server_dir = tmp_path / "offsite"
    client = RemoteRepo(tmp_path / "client", sshd.url("/not/what/the/key/serves"), sshd.append_only_client(server_dir))
    client.init()  # an append-only server accepts a new repository
    image = tmp_path / "disk.img"
    shas = [make_image(image, 2 * MiB, seed=22)]
    client.backup(image, name="db")
    shas.append(change(image, 0, b"\x01" * 4096))
    client.backup(image, name="db")
    ids = client.point_ids()
    before = sorted((p.relative_to(server_dir), p.read_bytes()) for p in server_dir.rglob("*") if p.is_file())

    client.fails("forget", "--keep-last", "1", code=1, words=["append-only", "server"])
    client.fails("gc", code=1, words=["append-only", "server"])
    client.fails("passwd", code=1, words=["append-only"], env=client.env(SUREPOINT_NEW_PASSPHRASE="stolen"))
    after = sorted((p.relative_to(server_dir), p.read_bytes()) for p in server_dir.rglob("*") if p.is_file())
    assert [n for n, _ in after if not str(n).startswith("locks/")] == [n for n, _ in before]
    assert after == before, "an append-only client changed the repository"
    assert client.point_ids() == ids
    for point_id, sha in zip(ids, shas, strict=True):
        client.restore_matches(point_id, sha)

    # Pruning runs on the server, with a local surepoint on the directory.
    server = Repo(tmp_path / "server-side", repo=server_dir, catalog=tmp_path / "server.sqlite")
    server.ok("forget", "--keep-last", "1", "--prune")
    assert client.point_ids() == ids[-1:]
    client.restore_matches("db:latest", shas[-1])
