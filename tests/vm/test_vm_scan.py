"""The change signal on the running test VM: normal churn is not "suspicious", a guest process that
encrypts files in place with openssl is, and `scan --find-clean` names the point before it.

Each step changes the guest the way a normal system does (a package upgrade replacing files under
/usr, database writes, a log rotated with gzip, generated binaries), then takes an incremental
backup. SUREPOINT_SCAN_ROUNDS=N repeats the churn N times (bench/scan_signal.py runs a bigger
matrix and prints the figures); CI runs one round.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.vm.test_vm_backup import good_backup

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("no_surepoint_bitmaps")]

MiB = 1 << 20
WORK = "/srv/sp-churn"

# Prose-like text: lines drawn from a seeded pool of sentences.
TEXT = r"""
my ($path, $bytes, $seed, $stamp) = @ARGV; srand($seed);
my @w = qw(the report shows revenue growth in all regions while costs stayed flat and the team
  plans new hires for support sales engineering during next quarter customer orders shipped late
  because supplier invoices were delayed review meeting notes action items owner deadline budget);
my @pool = map { my $n = 6 + int rand 14; join(" ", map { $w[int rand @w] } 1..$n) . ".\n" } 1..4000;
open(my $f, ">", $path) or die "$path: $!";
my $len = 0; my $i = 0;
while ($len < $bytes) {
    my $line = $stamp ? sprintf("%s app[%d]: req=%08x %s", $stamp, 1000 + $i % 97, $i * 2654435761 % 4294967296,
        $pool[int rand @pool]) : $pool[int rand @pool];
    print $f $line; $len += length $line; $i++;
}
close $f or die;
"""

# A package upgrade: every regular file under the directories is rewritten to a new name and
# renamed over the old one (what dpkg does); content identical, blocks new.
UPGRADE = r"""
my $limit = shift @ARGV; my $done = 0;
for my $dir (@ARGV) {
    opendir(my $d, $dir) or next;
    for my $name (sort readdir $d) {
        my $p = "$dir/$name";
        next if -l $p || ! -f $p;
        last if $done > $limit;
        open(my $in, "<:raw", $p) or next; local $/; my $data = <$in>; close $in;
        my @st = stat $p;
        open(my $out, ">:raw", "$p.dpkg-new") or die "$p: $!"; print $out $data; close $out or die;
        chmod $st[2] & 07777, "$p.dpkg-new"; chown $st[4], $st[5], "$p.dpkg-new";
        rename "$p.dpkg-new", $p or die; $done += length $data;
    }
}
print "$done\n";
"""

# Build output: shared libraries patched at a few places, as a compiler's output differs per build.
BUILD = r"""
my ($out, $bytes, $seed) = @ARGV; srand($seed); my $done = 0; my $n = 0;
my @libs = grep { -f $_ && ! -l $_ && -s $_ > 100000 } glob("/usr/lib/x86_64-linux-gnu/*.so.*");
while ($done < $bytes) {
    my $lib = $libs[$n % @libs]; open(my $in, "<:raw", $lib) or die; local $/; my $data = <$in>; close $in;
    for (1..64) { substr($data, int rand length $data, 4) = pack("N", int rand 4294967295) }
    open(my $o, ">:raw", "$out/obj$n.so") or die; print $o $data; close $o or die;
    $done += length $data; $n++;
}
"""

DATABASE = """
CREATE TABLE IF NOT EXISTS orders(id INTEGER PRIMARY KEY, customer TEXT, email TEXT, item TEXT, amount REAL,
    note TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
INSERT INTO orders(customer, email, item, amount, note)
SELECT printf('customer %d', abs(random()) % 5000), printf('user%d@example.com', abs(random()) % 5000),
       printf('item-%04d', abs(random()) % 800), (abs(random()) % 100000) / 100.0,
       printf('order placed via %s, priority %d, ref %s', CASE abs(random()) % 3 WHEN 0 THEN 'web' WHEN 1 THEN 'phone'
       ELSE 'partner' END, abs(random()) % 5, hex(randomblob(4)))
FROM n;
UPDATE orders SET amount = amount * 1.05, note = note || ' (repriced)' WHERE id % 3 = 0;
DELETE FROM orders WHERE id % 17 = 0;
"""

RANSOM = r"""
set -e
for f in "$@"; do
  [ -f "$f" ] || continue
  openssl enc -aes-256-cbc -pbkdf2 -pass pass:not-your-key -in "$f" -out "$f.sp-tmp"
  cat "$f.sp-tmp" > "$f"   # the same file, its contents replaced by ciphertext
  rm -f "$f.sp-tmp"
  mv "$f" "$f.locked"
done
echo "YOUR FILES ARE ENCRYPTED" > /srv/sp-churn/READ-ME-NOW.txt
sync
"""


def perl(test_vm, script: str, *args: str, timeout: float = 300) -> bytes:
    return test_vm.run(["perl", "-e", script, *args], timeout=timeout)


def sh(test_vm, script: str, *args: str, timeout: float = 300) -> bytes:
    return test_vm.run(["sh", "-c", script, "sh", *args], timeout=timeout)


def test_churn_is_not_suspicious_and_encryption_is(test_vm, cli: Cli, tmp_path: Path) -> None:
    rounds = int(os.environ.get("SUREPOINT_SCAN_ROUNDS", "1"))
    cli.run("init", check=True)
    sh(test_vm, 'rm -rf "$1" && mkdir -p "$1/docs" "$1/db" "$1/log" "$1/build"', WORK)
    try:
        sh(  # one guest command for all 40 documents: each agent round trip is slow under TCG
            test_vm,
            'for i in $(seq -w 0 39); do perl -e "$1" "$2/report-$i.txt" "$3" "$i" ""; done && sync',
            TEXT,
            f"{WORK}/docs",
            str(1 * MiB),
        )
        labels: dict[str, str] = {}
        base, _ = good_backup(cli, test_vm.name)
        labels[base["restore_point"]] = "full backup (40 MiB of documents added)"
        normal: list[str] = []
        for r in range(rounds):
            for point_id, label in churn_with_backups(test_vm, cli, r):
                labels[point_id] = label
                normal.append(point_id)
        started = time.monotonic()
        sh(test_vm, RANSOM + "\n", *[f"{WORK}/docs/report-{i:02d}.txt" for i in range(40)], f"{WORK}/db/app.db")
        encrypt_seconds = time.monotonic() - started
        attacked, _ = good_backup(cli, test_vm.name)
        labels[attacked["restore_point"]] = "documents and database encrypted in place with openssl"

        points = {p["id"]: p for p in cli.points()}
        print(f"\nchange signal, {rounds} round(s) of churn (openssl run took {encrypt_seconds:.0f} s):")
        for point_id, label in labels.items():
            p = points[point_id]
            new = sum(d["new_bytes"] for d in p["disks"])
            zeros = sum(d["metadata"].get("new_zero_bytes", 0) for d in p["disks"])
            stored = sum(d["stored_bytes"] for d in p["disks"])
            ratio = stored / (new - zeros) if new > zeros else 0.0
            flag = "SUSPICIOUS" if p["suspicious"] else "-"
            print(
                f"  {point_id}  new {new / MiB:6.1f} MiB (zero blocks {zeros / MiB:5.1f})  stored {stored / MiB:6.1f}"
                f"  stored/data {ratio:.2f}  {flag:10s}  {label}"
            )
        false_positives = [labels[p] for p in normal if points[p]["suspicious"]]
        print(
            f"false positives: {len(false_positives)} of {len(normal)}; encryption flagged: "
            f"{bool(points[attacked['restore_point']]['suspicious'])}"
        )
        assert not false_positives, false_positives
        assert points[attacked["restore_point"]]["suspicious"], points[attacked["restore_point"]]

        found = cli.run("scan", "--find-clean", test_vm.name, "--json", check=True).json()
        assert found["clean"] == normal[-1], found
        assert [p["restore_point"] for p in found["passed_over"]] == [attacked["restore_point"]]
        assert found["passed_over"][0]["reason"].startswith("suspicious")
    finally:
        sh(test_vm, 'rm -rf "$1" && sync', WORK)


def churn_with_backups(test_vm, cli: Cli, round_: int):
    """Each churn step followed at once by an incremental backup: yields (restore point, what changed)."""
    for name, description in churn_steps(test_vm, round_):
        vm, _ = good_backup(cli, test_vm.name)
        yield vm["restore_point"], f"{name}: {description}"


def churn_steps(test_vm, round_: int):
    """The churn of one round as a generator: each step is done when the next value is asked for."""
    upgraded = perl(test_vm, UPGRADE, str(40 * MiB), "/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/sbin")
    yield "package upgrade", f"{int(upgraded) // MiB} MiB of files under /usr replaced (dpkg style)"
    rows = 150_000
    test_vm.run(["sqlite3", f"{WORK}/db/app.db", DATABASE.format(rows=rows)], timeout=300)
    yield "database writes", f"SQLite: {rows} rows inserted, a third updated, some deleted"
    stamp = f"Nov 30 12:{round_:02d}:00 surepoint-test"
    perl(test_vm, TEXT, f"{WORK}/log/app.log", str(32 * MiB), str(100 + round_), stamp)
    yield "log written", "32 MiB of log lines in /srv/sp-churn/log/app.log"
    sh(test_vm, 'cd "$1" && gzip -c app.log > "app.log.$2.gz" && : > app.log && sync', f"{WORK}/log", str(round_))
    perl(test_vm, TEXT, f"{WORK}/log/app.log", str(4 * MiB), str(200 + round_), stamp)
    yield "log rotation", "app.log compressed with gzip into app.log.N.gz, then 4 MiB of new lines"
    sh(test_vm, 'rm -rf "$1" && mkdir -p "$1"', f"{WORK}/build")
    perl(test_vm, BUILD, f"{WORK}/build", str(32 * MiB), str(round_))
    yield "generated binaries", "32 MiB of rebuilt shared objects (no compiler in the guest: patched copies)"
