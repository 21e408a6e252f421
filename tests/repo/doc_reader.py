"""A repository reader written from docs/repository-format.md alone, for tests/repo/test_format_doc_reader.py.

It imports nothing from surepoint: every rule here is one the document states, so when the code
and the document drift apart, restoring through this reader fails. It reads a local-directory
repository (object `a/b` is the file `<root>/a/b`) and is strict: whatever the document calls
damage raises `Damaged`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

CIPHERS = {"aes-256-gcm": (1, AESGCM), "chacha20-poly1305": (2, ChaCha20Poly1305)}
KIND = {"chunk": 1, "index": 2, "manifest": 3, "record": 4}
MANIFEST_NAME = re.compile(r"^[0-9a-f]{16}$")
CHUNK_NAME = re.compile(r"^[0-9a-f]{64}$")
ZERO_ID = bytes(32)


class Damaged(Exception):
    pass


class WrongPassphrase(Exception):
    pass


def b64(text: str) -> bytes:
    """Standard alphabet, padded (the document's convention)."""
    return base64.b64decode(text, validate=True)


class DocReader:
    def __init__(self, root: str, passphrase: str | None = None) -> None:
        self.root = root
        with open(os.path.join(root, "config"), encoding="utf-8") as f:
            self.config = json.load(f)
        if self.config.get("format") != "surepoint-repository" or self.config.get("version") != 1:
            raise Damaged("not a version-1 surepoint repository")
        self.repository_id: str = self.config["id"]
        encryption = self.config["encryption"]
        self.cipher_code = 0
        self.aead = None
        self.id_key = None
        if encryption:
            self.cipher_code, cipher = CIPHERS[encryption["cipher"]]
            kdf = encryption["kdf"]
            assert kdf["name"] == "scrypt"
            kek = Scrypt(salt=b64(kdf["salt"]), length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
                (passphrase or "").encode("utf-8")
            )
            blob = b64(encryption["wrapped_key"])
            ad = b"surepoint-key:" + self.repository_id.encode("ascii")
            try:
                plain = cipher(kek).decrypt(blob[:12], blob[12:], ad)
            except InvalidTag:
                raise WrongPassphrase() from None
            keys = json.loads(plain.decode("utf-8"))
            self.aead = cipher(b64(keys["data"]))
            self.id_key = b64(keys["chunk_id"])
            assert len(self.id_key) == 32

    # objects ------------------------------------------------------------------------------------

    def _file(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def open_envelope(self, kind: str, binding: str, blob: bytes) -> bytes:
        if len(blob) < 8 or blob[:4] != b"SPO1":
            raise Damaged(f"{binding}: bad magic")
        header = blob[:8]
        got_kind, compression, cipher = blob[4], blob[5], blob[6]
        if got_kind != KIND[kind]:
            raise Damaged(f"{binding}: kind {got_kind}")
        if cipher != self.cipher_code:
            raise Damaged(f"{binding}: cipher {cipher} is not the repository's")
        ad = header + binding.encode("ascii")
        body = blob[8:]
        if self.aead is not None:
            try:
                payload = self.aead.decrypt(body[:12], body[12:], ad)
            except InvalidTag:
                raise Damaged(f"{binding}: authentication failed") from None
        else:
            payload, check = body[:-32], body[-32:]
            if len(body) < 32 or blake3.blake3(ad + payload).digest() != check:
                raise Damaged(f"{binding}: checksum")
        if compression == 1:
            return zstandard.ZstdDecompressor().decompress(payload)
        if compression != 0:
            raise Damaged(f"{binding}: compression {compression}")
        return payload

    def chunk_id(self, data: bytes) -> bytes:
        if self.id_key is not None:
            return blake3.blake3(data, key=self.id_key).digest()
        return blake3.blake3(data).digest()

    def chunk(self, chunk_id: bytes) -> bytes:
        hexid = chunk_id.hex()
        try:
            blob = self._file(f"chunks/{hexid[:2]}/{hexid}")
        except FileNotFoundError:
            blob = self._file(f"trash/{hexid}")  # after an interrupted gc (the document's advice)
        data = self.open_envelope("chunk", hexid, blob)
        if self.chunk_id(data) != chunk_id:
            raise Damaged(f"chunk {hexid}: content does not match its id")
        return data

    # restore points -------------------------------------------------------------------------

    def manifests(self) -> list[dict]:
        """Every restore point, ordered by created, then id (the document's order)."""
        points = []
        for name in os.listdir(os.path.join(self.root, "restorepoints")):
            if not MANIFEST_NAME.match(name):
                continue
            object_name = f"restorepoints/{name}"
            point = json.loads(self.open_envelope("manifest", object_name, self._file(object_name)).decode("utf-8"))
            if point["id"] != name or point["version"] != 1:
                raise Damaged(f"{object_name}: id or version")
            points.append(point)
        return sorted(points, key=lambda p: (p["created"], p["id"]))

    def latest(self, name: str) -> dict:
        return [p for p in self.manifests() if p["name"] == name][-1]

    def index(self, disk: dict) -> tuple[int, int, list[bytes]]:
        data = self.open_envelope("index", disk["index"], self._file(disk["index"]))
        magic, version, _r1, disk_size, chunk_size, digest_size, _r2, count = struct.unpack_from("<4sHHQIHHQ", data)
        if magic != b"SPFX" or version != 1 or digest_size != 32:
            raise Damaged(f"{disk['index']}: header")
        if count != -(-disk_size // chunk_size) or len(data) != 32 + 32 * count:
            raise Damaged(f"{disk['index']}: entry count")
        if disk_size != disk["size"]:
            raise Damaged(f"{disk['index']}: disk size differs from the manifest")
        return disk_size, chunk_size, [data[32 + 32 * i : 64 + 32 * i] for i in range(count)]

    def restore(self, point: dict, number: int) -> bytes:
        disk = next(d for d in point["disks"] if d["number"] == number)
        disk_size, chunk_size, ids = self.index(disk)
        out = bytearray()
        for i, chunk_id in enumerate(ids):
            length = min(chunk_size, disk_size - i * chunk_size)
            if chunk_id == ZERO_ID:
                out += bytes(length)
                continue
            data = self.chunk(chunk_id)
            if len(data) != length:
                raise Damaged(f"chunk {i} of disk {number}: {len(data)} bytes, its range has {length}")
            out += data
        return bytes(out)

    # log records -------------------------------------------------------------------------------

    def log_file(self, name: str, writer: str, file: str) -> bytes:
        """A shipped transaction-log file, by restore-point name, writer and file name."""
        series = self.chunk_id(b"log-series:" + name.encode("utf-8")).hex()[:32]
        object_name = f"logs/{series}/{writer}/{file}"
        record = json.loads(self.open_envelope("record", object_name, self._file(object_name)).decode("utf-8"))
        if (record["name"], record["writer"], record["file"]) != (name, writer, file):
            raise Damaged(f"{object_name}: names another log")
        data = b"".join(self.chunk(bytes.fromhex(c)) for c in record["chunks"])
        if len(data) != record["size"]:
            raise Damaged(f"{object_name}: size")
        return data


def passphrase_from_file(path: str) -> str:
    """UTF-8 text, line endings read as \\n, every trailing \\n removed, nothing else stripped."""
    with open(path, encoding="utf-8", newline=None) as f:
        return f.read().rstrip("\n")
