#!/usr/bin/env python3
"""Build the benchmark disk images: a sparse raw disk with an ext4 filesystem of mixed content (v1), and a
copy of it with about 2% of its allocated blocks changed (v2).

    python3 bench/make_image.py [--size 4G] [--seed 1] [--workdir /var/tmp/surepoint-bench]
    python3 bench/make_image.py --change [--change-mode files|blocks] ...

v1 is populated without mounting: the files are generated in a staging directory under the work dir,
`mkfs.ext4 -d STAGING` copies them into the image, and the staging directory is deleted.  Content mix (shares
of the data written, the image is filled to --fill, 60% by default):

    prose documents 9%, log files 8% (+3% gzip-rotated logs), CSV/JSONL 4%, Python sources copied from
    /usr/lib/python3* 3%, ELF binaries and libraries copied from /usr/bin and /usr/lib 20%, incompressible
    random blobs 21%, a SQLite database 12%, and duplicates 20% (byte-identical copies of earlier files in
    other directories, so deduplication matters).

--change copies v1 to v2 (`cp --reflink=auto --sparse=always`) and changes it.  Mode `files` (the default)
loop-mounts v2 and changes it like a running system would: UPDATE and INSERT rows in the SQLite database,
append to log files, rewrite regions inside existing blobs in place, edit documents editor-style (write a new
file and rename it over the old one), add new files (random downloads and copies of existing binaries) and
delete a few small files.  Mode `blocks` (no mount needed) overwrites runs of allocated 4 KiB blocks of the
image at random with new random data; it may hit filesystem metadata, which the backup tools do not care about.
Either way the number of 4 KiB blocks that differ between v1 and v2 is measured and written to v2's manifest.

All content comes from random.Random streams seeded from --seed; file times, the filesystem UUID, hash seed
and mkfs time are fixed, so v1 is byte-identical across runs on the same machine (the copied system files are
whatever /usr holds).  v2 in `files` mode also carries the kernel's own metadata writes (mount times, journal).
"""

from __future__ import annotations

import argparse
import bisect
import errno
import gzip
import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

DEFAULT_WORKDIR = "/var/tmp/surepoint-bench"
BLOCK = 4096
CHANGE_RECIPE = 3  # bump when change_files/change_blocks change, so cached v2 images are rebuilt
FIXED_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z, every staged file gets a time derived from this

SHARES = {
    "prose": 0.09,
    "logs": 0.08,
    "logs_gz": 0.03,
    "tables": 0.04,
    "pysrc": 0.03,
    "binaries": 0.20,
    "random": 0.21,
    "sqlite": 0.12,
    "duplicates": 0.20,
}

# ---------------------------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    """'4G', '512M', '4GiB', '1048576' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def size_label(n: int) -> str:
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def image_paths(workdir: str | Path, size: int, seed: int) -> tuple[Path, Path]:
    base = Path(workdir) / "images" / f"disk-{size_label(size)}-seed{seed}"
    return base.with_name(base.name + "-v1.img"), base.with_name(base.name + "-v2.img")


def manifest_path(image: Path) -> Path:
    return image.with_suffix(".json")


def load_manifest(image: Path) -> dict:
    try:
        return json.loads(manifest_path(image).read_text())
    except (OSError, ValueError):
        return {}


def save_manifest(image: Path, data: dict) -> None:
    manifest_path(image).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def data_extents(path: str | Path) -> list[tuple[int, int]]:
    """(offset, length) of the data (non-hole) ranges of a file, via SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out: list[tuple[int, int]] = []
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            off = end
        return out
    finally:
        os.close(fd)


def allocated_bytes(path: str | Path) -> int:
    return os.stat(path).st_blocks * 512


def sha256_sparse(path: str | Path, bufsize: int = 16 << 20) -> str:
    """sha256 of a file's full logical content; holes are hashed as zeros without reading them."""
    h = hashlib.sha256()
    zeros = memoryview(bytes(bufsize))
    size = os.stat(path).st_size
    pos = 0
    with open(path, "rb", buffering=0) as f:
        for off, length in data_extents(path) + [(size, 0)]:
            while pos < off:  # hole
                n = min(bufsize, off - pos)
                h.update(zeros[:n])
                pos += n
            f.seek(off)
            end = off + length
            while pos < end:
                chunk = f.read(min(bufsize, end - pos))
                if not chunk:
                    raise OSError(f"{path}: short read at {pos}")
                h.update(chunk)
                pos += len(chunk)
    return h.hexdigest()


def cached_sha256(image: Path) -> str:
    """sha256 of an image, cached in its manifest (keyed by size and mtime)."""
    st = os.stat(image)
    key = f"{st.st_size}:{st.st_mtime_ns}"
    m = load_manifest(image)
    if m.get("sha256_key") == key and m.get("sha256"):
        return m["sha256"]
    digest = sha256_sparse(image)
    m.update(sha256=digest, sha256_key=key)
    save_manifest(image, m)
    return digest


def changed_blocks(a: Path, b: Path, window: int = 8 << 20) -> int:
    """Number of 4 KiB blocks whose content differs between two images of the same size."""
    size = os.stat(a).st_size
    ext = sorted(data_extents(a) + data_extents(b))
    starts = [o for o, _ in ext]
    ends_prefix_max: list[int] = []
    m = 0
    for o, n in ext:
        m = max(m, o + n)
        ends_prefix_max.append(m)

    def has_data(off: int, length: int) -> bool:
        i = bisect.bisect_left(starts, off + length)  # extents starting before the window's end
        return i > 0 and ends_prefix_max[i - 1] > off

    diff = 0
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        for off in range(0, size, window):
            n = min(window, size - off)
            if not has_data(off, n):
                continue
            fa.seek(off)
            fb.seek(off)
            x, y = fa.read(n), fb.read(n)
            if x == y:
                continue
            for i in range(0, n, BLOCK):
                if x[i : i + BLOCK] != y[i : i + BLOCK]:
                    diff += 1
    return diff


def rand_stream(seed: int, name: str) -> random.Random:
    return random.Random(f"surepoint-bench:{seed}:{name}")


def log(msg: str) -> None:
    print(f"[make_image {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- text


class TextGen:
    """Prose, log lines and tables from a Zipf-weighted vocabulary of pseudo-words."""

    SYLLABLES = (  # noqa: SIM905
        "ka ri to ne sa mi lo va en ar or is un te da po li ma re no su chi ra ko be fi ga ho ju "
        "ze qua tri stra pro con ter mon al el il ul an in on ex per"
    ).split()
    COMMON = (  # noqa: SIM905
        "the of and to in is that for it as was with be by on not he this are or his from at which but "
        "have an they you were their one all we can her has there been if more when will would who so no"
    ).split()

    def __init__(self, r: random.Random) -> None:
        self.r = r
        words = set(self.COMMON)
        while len(words) < 6000:
            words.add("".join(r.choice(self.SYLLABLES) for _ in range(r.randint(1, 4))))
        self.vocab = self.COMMON + sorted(words - set(self.COMMON))
        r.shuffle(self.vocab[len(self.COMMON) :])
        self.cum: list[float] = []
        total = 0.0
        for rank in range(len(self.vocab)):
            total += 1.0 / (rank + 1.5)
            self.cum.append(total)

    def words(self, k: int) -> list[str]:
        return self.r.choices(self.vocab, cum_weights=self.cum, k=k)

    def prose(self, nbytes: int) -> bytes:
        r = self.r
        out: list[str] = []
        n = 0
        while n < nbytes:
            words = self.words(2048)
            sentences = []
            i = 0
            while i < len(words):
                k = 5 + r.getrandbits(4)
                s = " ".join(words[i : i + k])
                sentences.append(s[:1].upper() + s[1:] + r.choice(".....?!;"))
                i += k
            for j in range(0, len(sentences), 6):
                para = " ".join(sentences[j : j + 6]) + "\n\n"
                out.append(para)
                n += len(para)
        return "".join(out).encode()[:nbytes]

    def log_lines(self, nbytes: int, start: int = 0) -> bytes:
        r = self.r
        hosts = [f"node{n:02d}" for n in range(12)]
        svcs = ["api", "worker", "scheduler", "db-proxy", "auth", "cron", "ingest"]
        levels = ["INFO"] * 12 + ["DEBUG"] * 5 + ["WARN"] * 2 + ["ERROR"]
        out: list[str] = []
        n = 0
        t = start
        while n < nbytes:
            w = self.words(400)
            for i in range(0, 400, 4):
                t += r.getrandbits(9)
                s, ms = divmod(t, 1000)
                mi, s = divmod(s, 60)
                h, mi = divmod(mi, 60)
                d, h = divmod(h, 24)
                line = (
                    f"2024-03-{1 + d % 28:02d}T{h:02d}:{mi:02d}:{s:02d}.{ms:03d}Z {r.choice(hosts)} "
                    f"{r.choice(svcs)}[{1000 + r.getrandbits(14)}]: {r.choice(levels)} {w[i]} {w[i + 1]} "
                    f"{w[i + 2]} {w[i + 3]} request_id={r.getrandbits(64):016x} "
                    f"latency_ms={r.getrandbits(10)} status={r.choice((200, 200, 200, 201, 204, 404, 500))}\n"
                )
                out.append(line)
                n += len(line)
        return "".join(out).encode()[:nbytes]

    def csv_rows(self, nbytes: int) -> bytes:
        r = self.r
        out = ["id,date,customer,product,quantity,unit_price,region,comment\n"]
        n = len(out[0])
        i = 0
        while n < nbytes:
            w = self.words(300)
            for j in range(0, 300, 3):
                i += 1
                line = (
                    f"{i},2023-{1 + r.getrandbits(4) % 12:02d}-{1 + r.getrandbits(5) % 28:02d},"
                    f"C{r.getrandbits(20):07d},{w[j]}-{r.getrandbits(8)},{1 + r.getrandbits(6)},"
                    f"{r.getrandbits(16) / 100:.2f},{r.choice(('eu', 'us', 'apac', 'latam'))},"
                    f"{w[j + 1]} {w[j + 2]}\n"
                )
                out.append(line)
                n += len(line)
        return "".join(out).encode()[:nbytes]

    def jsonl(self, nbytes: int) -> bytes:
        r = self.r
        out: list[str] = []
        n = 0
        while n < nbytes:
            w = self.words(200)
            for j in range(0, 200, 4):
                rec = {
                    "id": r.getrandbits(48),
                    "user": w[j],
                    "action": w[j + 1],
                    "tags": [w[j + 2], w[j + 3]],
                    "score": round(r.random() * 100, 3),
                    "ok": bool(r.getrandbits(1)),
                }
                line = json.dumps(rec) + "\n"
                out.append(line)
                n += len(line)
        return "".join(out).encode()[:nbytes]


# ---------------------------------------------------------------------------------------------- staging


class Stager:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.files: list[tuple[str, str, int]] = []  # (relative path, category, size)
        self.written: dict[str, int] = {}

    def write(self, rel: str, data: bytes, category: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self._account(rel, category, len(data))

    def copy(self, src: str | Path, rel: str, category: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, p)
        self._account(rel, category, p.stat().st_size)

    def _account(self, rel: str, category: str, size: int) -> None:
        self.files.append((rel, category, size))
        self.written[category] = self.written.get(category, 0) + size


def system_files(roots: list[str], want_elf: bool, suffixes: tuple[str, ...] = ()) -> list[Path]:
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath, fn)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not (os.path.isfile(p) and not p.is_symlink() and 8192 <= st.st_size <= (64 << 20)):
                    continue
                if suffixes and not fn.endswith(suffixes):
                    continue
                if want_elf:
                    try:
                        with open(p, "rb") as f:
                            if f.read(4) != b"\x7fELF":
                                continue
                    except OSError:
                        continue
                out.append(p)
    return out


def stage(root: Path, data_target: int, seed: int) -> Stager:
    st = Stager(root, seed)
    budget = {k: int(v * data_target) for k, v in SHARES.items()}
    tg = TextGen(rand_stream(seed, "text"))

    # prose documents: 16 KiB .. 2 MiB each
    r = rand_stream(seed, "prose")
    users = ["alice", "bob", "carol", "dave"]
    i = 0
    while st.written.get("prose", 0) < budget["prose"]:
        n = min(int(r.lognormvariate(12.0, 1.0)) + 16384, 2 << 20, budget["prose"] - st.written.get("prose", 0))
        u = users[i % len(users)]
        st.write(f"home/{u}/documents/{r.choice(('notes', 'reports', 'drafts'))}/doc{i:05d}.md", tg.prose(n), "prose")
        i += 1
    log(f"prose: {i} files")

    # logs: a few big current logs plus rotated gz
    r = rand_stream(seed, "logs")
    names = ["syslog", "app/api.log", "app/worker.log", "nginx/access.log", "postgresql/main.log", "auth.log"]
    per = budget["logs"] // len(names) + 1
    for k, name in enumerate(names):
        st.write(f"var/log/{name}", tg.log_lines(per, start=k * 10_000_000), "logs")
    i = 0
    while st.written.get("logs_gz", 0) < budget["logs_gz"]:
        raw = tg.log_lines(4 << 20, start=i * 3_600_000)
        st.write(f"var/log/{names[i % len(names)]}.{i // len(names) + 2}.gz", gzip.compress(raw, 6, mtime=0), "logs_gz")
        i += 1
    log(f"logs: {len(names)} files + {i} rotated .gz")

    # tables: CSV exports and JSONL event dumps
    i = 0
    while st.written.get("tables", 0) < budget["tables"]:
        n = min(8 << 20, budget["tables"] - st.written.get("tables", 0) + 1)
        if i % 2:
            st.write(f"srv/exports/events-{i:04d}.jsonl", tg.jsonl(n), "tables")
        else:
            st.write(f"srv/exports/sales-{i:04d}.csv", tg.csv_rows(n), "tables")
        i += 1
    log(f"tables: {i} files")

    # python sources (many small real text files)
    srcs = system_files(sorted(str(p) for p in Path("/usr/lib").glob("python3*")), False, (".py",))
    srcs += [p for p in system_files(["/usr/lib/python3"], False, (".py",)) if p not in set(srcs)]
    for p in srcs:
        if st.written.get("pysrc", 0) >= budget["pysrc"]:
            break
        st.copy(p, "opt/venv" + str(p), "pysrc")
    log(f"pysrc: {sum(1 for f in st.files if f[1] == 'pysrc')} files")

    # binaries: ELF executables and libraries, random selection
    r = rand_stream(seed, "binaries")
    bins = system_files(["/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec"], True)
    r.shuffle(bins)
    for p in bins:
        if st.written.get("binaries", 0) >= budget["binaries"]:
            break
        if p.stat().st_size > budget["binaries"] - st.written.get("binaries", 0) + (1 << 20):
            continue
        st.copy(p, "opt/sysroot" + str(p), "binaries")
    log(f"binaries: {sum(1 for f in st.files if f[1] == 'binaries')} files from {len(bins)} candidates")

    # incompressible random blobs: 64 KiB .. 64 MiB
    r = rand_stream(seed, "random")
    cap = min(64 << 20, max(1 << 20, budget["random"] // 10))
    i = 0
    while st.written.get("random", 0) < budget["random"]:
        left = budget["random"] - st.written.get("random", 0)
        n = min(max(65536, int(r.lognormvariate(15.0, 1.5))), cap, left)
        kind = r.choice(("media/video", "media/photos", "vm/blobs", "downloads"))
        p = root / f"srv/{kind}/blob{i:05d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            for off in range(0, n, 1 << 20):
                f.write(r.randbytes(min(1 << 20, n - off)))
        st._account(str(p.relative_to(root)), "random", n)
        i += 1
    log(f"random: {i} blobs")

    # SQLite database
    build_sqlite(root / "var/lib/appdb/app.db", budget["sqlite"], rand_stream(seed, "sqlite"), tg)
    st._account("var/lib/appdb/app.db", "sqlite", (root / "var/lib/appdb/app.db").stat().st_size)
    log(f"sqlite: {st.written['sqlite'] >> 20} MiB")

    # duplicates: byte-identical copies of earlier files in other places
    r = rand_stream(seed, "dups")
    pool = [f for f in st.files if f[1] in ("prose", "binaries", "random", "logs_gz", "tables") and f[2] >= 16384]
    i = 0
    while st.written.get("duplicates", 0) < budget["duplicates"] and pool:
        rel, _, size = r.choice(pool)
        if size > budget["duplicates"] - st.written.get("duplicates", 0) + (1 << 20):
            continue
        dest = r.choice(("srv/backup/2024-01", "srv/backup/2024-02", "home/bob/Downloads", "home/carol/old-laptop"))
        st.copy(root / rel, f"{dest}/{i:04d}-{Path(rel).name}", "duplicates")
        i += 1
    log(f"duplicates: {i} copies")

    # deterministic times for everything
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            t = FIXED_MTIME + (int(hashlib.md5(p[len(str(root)) :].encode()).hexdigest()[:6], 16) % 5_000_000)
            os.utime(p, (t, t), follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))
    return st


def build_sqlite(path: Path, nbytes: int, r: random.Random, tg: TextGen) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(
        """
        PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
        CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT, email TEXT, country TEXT, created INTEGER);
        CREATE TABLE events(id INTEGER PRIMARY KEY, ts INTEGER, customer INTEGER, kind TEXT, amount REAL,
                            status TEXT, payload TEXT, attachment BLOB);
        """
    )
    countries = ["de", "fr", "us", "jp", "br", "in", "uk", "es", "it", "ca"]
    w = tg.words(60000)
    db.executemany(
        "INSERT INTO customers VALUES (?,?,?,?,?)",
        (
            (i, f"{w[2 * i]} {w[2 * i + 1]}", f"{w[2 * i]}{i}@example.com", r.choice(countries), 1.6e9 + i)
            for i in range(20000)
        ),
    )
    kinds = ["order", "refund", "login", "view", "cart", "payment", "shipment"]
    statuses = ["new", "done", "failed", "pending"]
    written = 0
    next_id = 1
    while written < nbytes:
        rows = []
        words = tg.words(40 * 2000)
        for j in range(2000):
            payload = " ".join(words[40 * j : 40 * j + 10 + r.getrandbits(5)])
            blob = r.randbytes(32 + r.getrandbits(7))
            rows.append(
                (
                    next_id,
                    1_700_000_000 + next_id * 7,
                    r.getrandbits(14),
                    r.choice(kinds),
                    r.getrandbits(20) / 100,
                    r.choice(statuses),
                    payload,
                    blob,
                )
            )
            next_id += 1
            written += 60 + len(payload) + len(blob)
        db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
    db.execute("CREATE INDEX events_customer ON events(customer, ts)")
    db.commit()
    db.close()


def make_v1(workdir: Path, size: int, seed: int, fill: float = 0.6, force: bool = False) -> Path:
    v1, _ = image_paths(workdir, size, seed)
    if v1.exists() and not force and load_manifest(v1).get("complete"):
        log(f"{v1} exists, keeping it (use --force to rebuild)")
        return v1
    v1.parent.mkdir(parents=True, exist_ok=True)
    need = int(size * fill * 2.2)
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"not enough space in {workdir}: need ~{need >> 20} MiB, have {free >> 20} MiB")
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=workdir))
    t0 = time.time()
    try:
        # data target: fill of the filesystem minus a little for ext4 metadata (journal, inode tables)
        target = int(size * fill * 0.97)
        log(f"staging ~{target >> 20} MiB of files in {staging}")
        st = stage(staging, target, seed)
        u = str(uuid.UUID(bytes=hashlib.sha256(f"fs:{seed}".encode()).digest()[:16], version=4))
        tmp = v1.with_suffix(".img.tmp")
        tmp.unlink(missing_ok=True)
        v1.with_suffix(".img.tmp2").unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            f.truncate(size)
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_MTIME))
        cmd = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "benchdisk",
            "-U",
            u,
            "-E",
            f"hash_seed={u},root_owner=0:0,nodiscard,lazy_itable_init=1",
            "-d",
            str(staging),
            str(tmp),
        ]
        log("running " + " ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
        # mkfs -d copies each file's ctime (the staging time); pin it so the image is reproducible
        cmds = tmp.with_suffix(".debugfs")
        with open(cmds, "w") as f:
            for p in ["/", "/lost+found"] + sorted("/" + str(q.relative_to(staging)) for q in staging.rglob("*")):
                f.write(f'sif "{p}" ctime @{FIXED_MTIME}\n')
        subprocess.run(["debugfs", "-w", "-f", str(cmds), str(tmp)], check=True, env=env, capture_output=True)
        cmds.unlink()
        # mkfs writes the image out of order, leaving the file fragmented on the host filesystem; a sequential
        # sparse copy lays it out like v2 (made by cp too), so full and incremental reads start from equal footing
        tmp2 = v1.with_suffix(".img.tmp2")
        subprocess.run(["cp", "--sparse=always", str(tmp), str(tmp2)], check=True)
        tmp.unlink()
        os.replace(tmp2, v1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(v1)], capture_output=True, text=True)
    df = subprocess.run(["dumpe2fs", "-h", str(v1)], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in df.splitlines() if ":" in line)
    bcount, bfree = int(fields["Block count"]), int(fields["Free blocks"])
    m = {
        "complete": True,
        "version": "v1",
        "size": size,
        "seed": seed,
        "fill_target": fill,
        "fs_used_fraction": round((bcount - bfree) / bcount, 4),
        "allocated_bytes": allocated_bytes(v1),
        "written_by_category": st.written,
        "files": len(st.files),
        "fsck_clean": fsck.returncode == 0,
        "build_seconds": round(time.time() - t0, 1),
    }
    save_manifest(v1, m)
    log(
        f"v1 ready: {v1} ({m['allocated_bytes'] >> 20} MiB allocated, fs {m['fs_used_fraction']:.0%} used, "
        f"fsck {'clean' if m['fsck_clean'] else 'NOT clean'}) in {m['build_seconds']} s"
    )
    return v1


# ---------------------------------------------------------------------------------------------- change


def change_files(img: Path, budget: int, seed: int, workdir: Path) -> dict:
    """Loop-mount the image and change it like a live system would.  Returns bytes written per action."""
    r = rand_stream(seed, "change")
    tg = TextGen(rand_stream(seed, "change-text"))
    mnt = Path(tempfile.mkdtemp(prefix="mnt-", dir=workdir))
    done: dict[str, int] = {}
    subprocess.run(["mount", "-o", "loop,noinit_itable", str(img), str(mnt)], check=True)
    try:
        files = sorted(p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink())
        rel = [p.relative_to(mnt) for p in files]

        # 1. SQLite: update random rows (pages rewritten in place) and insert new ones (appended)
        db = sqlite3.connect(mnt / "var/lib/appdb/app.db")
        (max_id,) = db.execute("SELECT max(id) FROM events").fetchone()
        # an updated row rewrites its page(s) and its original goes to the rollback journal first: ~4-5 blocks
        n_upd = int(0.25 * budget / BLOCK / 4)
        ids = [1 + r.randrange(max_id) for _ in range(n_upd)]
        w = tg.words(n_upd * 12 + 10)
        db.executemany(
            "UPDATE events SET status=?, amount=?, payload=? WHERE id=?",
            (
                (
                    r.choice(("done", "failed", "refunded")),
                    r.getrandbits(20) / 100,
                    " ".join(w[12 * k : 12 * k + 12]),
                    i,
                )
                for k, i in enumerate(ids)
            ),
        )
        ins, nid = 0, max_id + 1
        rows = []
        while ins < 0.05 * budget:
            payload = " ".join(tg.words(20))
            blob = r.randbytes(96)
            rows.append((nid, 1_800_000_000 + nid, r.getrandbits(14), "order", 1.0, "new", payload, blob))
            nid += 1
            ins += 60 + len(payload) + len(blob)
        db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
        db.commit()
        db.close()
        done["sqlite_updated_rows"] = n_upd
        done["sqlite_inserted_rows"] = len(rows)

        # 2. append to the current log files
        logs = [mnt / p for p in rel if str(p).startswith("var/log/") and str(p).endswith(("log", "syslog"))]
        per = int(0.20 * budget) // max(1, len(logs))
        for k, p in enumerate(logs):
            with open(p, "ab") as f:
                f.write(tg.log_lines(per, start=900_000_000 + k * 1_000_000))
        done["log_append_bytes"] = per * len(logs)

        # 3. rewrite regions inside existing random blobs in place (VM-disk / database style)
        blobs = [mnt / p for p in rel if str(p).startswith("srv/") and str(p).endswith(".bin")]
        blobs = [p for p in blobs if p.stat().st_size >= (1 << 20)]
        left = int(0.15 * budget)
        while left > 0 and blobs:
            p = r.choice(blobs)
            size = p.stat().st_size
            n = min(left, BLOCK * (1 + r.randrange(64)), size)
            off = r.randrange(0, max(1, (size - n) // BLOCK)) * BLOCK
            with open(p, "r+b") as f:
                f.seek(off)
                f.write(r.randbytes(n))
            left -= n
        done["inplace_rewrite_bytes"] = int(0.15 * budget) - max(0, left)

        # 4. edit documents editor-style: new file + rename over the old one
        docs = [mnt / p for p in rel if str(p).endswith(".md")]
        left = int(0.10 * budget)
        edited = 0
        while left > 0:
            docs = [p for p in docs if p.stat().st_size <= left]  # a whole document is rewritten: stay in budget
            if not docs:
                break
            p = docs.pop(r.randrange(len(docs)))
            text = p.read_bytes()
            cut = r.randrange(len(text) // 2 + 1)
            new = text[:cut] + tg.prose(2000 + r.randrange(8000)) + text[cut + r.randrange(2000) :]
            tmp = p.with_name("." + p.name + ".swp")
            tmp.write_bytes(new)
            os.replace(tmp, p)
            left -= len(new)
            edited += 1
        done["edited_documents"] = edited

        # 5. new files: random downloads, and copies of existing binaries (dedup-friendly)
        newdir = mnt / "home/alice/Downloads/new"
        newdir.mkdir(parents=True, exist_ok=True)
        left = int(0.10 * budget)
        k = 0
        while left > 0:
            n = min(left, 65536 + r.randrange(8 << 20))
            (newdir / f"download{k:03d}.bin").write_bytes(r.randbytes(n))
            left -= n
            k += 1
        bins = [mnt / p for p in rel if str(p).startswith("opt/sysroot/")]
        left = int(0.10 * budget)
        while left > 0:
            bins = [p for p in bins if p.stat().st_size <= left]
            if not bins:
                break
            p = r.choice(bins)
            shutil.copyfile(p, newdir / f"{k:03d}-{p.name}")
            left -= p.stat().st_size
            k += 1
        done["new_files"] = k

        # 6. delete a few small files
        small = [mnt / p for p in rel if str(p).startswith("opt/venv/")]
        r.shuffle(small)
        for p in small[: len(small) // 100]:
            p.unlink()
        done["deleted_files"] = len(small) // 100
        os.sync()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()
    return done


def change_blocks(img: Path, budget: int, seed: int) -> dict:
    """Overwrite runs of allocated 4 KiB blocks of the image with random data."""
    r = rand_stream(seed, "change-blocks")
    blocks: list[int] = []
    for off, length in data_extents(img):
        blocks.extend(range(off // BLOCK, (off + length) // BLOCK))
    target = budget // BLOCK
    hit: set[int] = set()
    with open(img, "r+b") as f:
        while len(hit) < target and blocks:
            start = r.randrange(len(blocks))
            run = 1 + r.randrange(16)
            for b in blocks[start : start + run]:
                if b not in hit:
                    f.seek(b * BLOCK)
                    f.write(r.randbytes(BLOCK))
                    hit.add(b)
    return {"overwritten_blocks": len(hit)}


def make_v2(
    workdir: Path, size: int, seed: int, fraction: float = 0.02, mode: str = "files", force: bool = False
) -> Path:
    v1, v2 = image_paths(workdir, size, seed)
    if not load_manifest(v1).get("complete"):
        sys.exit(f"{v1} is missing; build it first (run without --change)")
    m2 = load_manifest(v2)
    recipe = (load_manifest(v1).get("sha256_key", "none"), mode, fraction, CHANGE_RECIPE)
    same = (
        m2.get("base_sha256_key"),
        m2.get("change_mode"),
        m2.get("change_fraction_target"),
        m2.get("recipe"),
    ) == recipe
    if v2.exists() and not force and m2.get("complete") and same:
        log(f"{v2} exists, keeping it (use --force to rebuild)")
        return v2
    t0 = time.time()
    base_sha = cached_sha256(v1)
    tmp = v2.with_suffix(".img.tmp")
    tmp.unlink(missing_ok=True)
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(v1), str(tmp)], check=True)
    target = int(fraction * allocated_bytes(v1))
    log(f"changing {tmp.name} in mode '{mode}': target {fraction:.1%} of v1's allocated blocks ({target >> 20} MiB)")
    if mode == "files":
        try:
            # files mode writes about half the target itself; fs metadata, the journal, SQLite's rollback
            # journal and editor temp files make up the rest (measured below)
            actions = change_files(tmp, target // 2, seed, workdir)
        except (subprocess.CalledProcessError, OSError) as e:
            log(f"mounting failed ({e}); falling back to --change-mode blocks")
            mode = "blocks"
            tmp.unlink()
            subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(v1), str(tmp)], check=True)
    if mode == "blocks":
        actions = change_blocks(tmp, target, seed)
    os.replace(tmp, v2)
    diff = changed_blocks(v1, v2)
    fsck = subprocess.run(["e2fsck", "-fn", str(v2)], capture_output=True, text=True)
    alloc1 = allocated_bytes(v1)
    m = {
        "complete": True,
        "version": "v2",
        "size": size,
        "seed": seed,
        "base": v1.name,
        "base_sha256": base_sha,
        "base_sha256_key": load_manifest(v1).get("sha256_key"),
        "change_mode": mode,
        "change_fraction_target": fraction,
        "recipe": CHANGE_RECIPE,
        "actions": actions,
        "allocated_bytes": allocated_bytes(v2),
        "changed_blocks_4k": diff,
        "changed_fraction_of_v1_allocated": round(diff * BLOCK / alloc1, 5),
        "changed_fraction_of_logical": round(diff * BLOCK / size, 5),
        "fsck_clean": fsck.returncode == 0,
        "build_seconds": round(time.time() - t0, 1),
    }
    save_manifest(v2, m)
    log(
        f"v2 ready: {v2}: {diff} blocks of 4 KiB changed = {m['changed_fraction_of_v1_allocated']:.2%} of v1's "
        f"allocated blocks, {m['changed_fraction_of_logical']:.2%} of the disk; fsck "
        f"{'clean' if m['fsck_clean'] else 'NOT clean'}"
    )
    return v2


def ensure_images(
    workdir: str | Path, size: int, seed: int, fill: float = 0.6, fraction: float = 0.02, mode: str = "files"
) -> tuple[Path, Path]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    v1 = make_v1(workdir, size, seed, fill)
    v2 = make_v2(workdir, size, seed, fraction, mode)
    return v1, v2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--size", default="4G", help="logical disk size, e.g. 4G or 512M (default 4G)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill", type=float, default=0.6, help="filesystem fill fraction for v1 (default 0.6)")
    ap.add_argument("--change", action="store_true", help="make v2 from v1 (build v1 first without this flag)")
    ap.add_argument("--change-fraction", type=float, default=0.02, help="of v1's allocated blocks (default 0.02)")
    ap.add_argument("--change-mode", choices=("files", "blocks"), default="files")
    ap.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    a = ap.parse_args()
    if os.geteuid() != 0:
        log("warning: not root; mkfs -d may set odd owners and --change-mode files cannot mount")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    size = parse_size(a.size)
    if a.change:
        print(make_v2(workdir, size, a.seed, a.change_fraction, a.change_mode, a.force))
    else:
        print(make_v1(workdir, size, a.seed, a.fill, a.force))


if __name__ == "__main__":
    main()
