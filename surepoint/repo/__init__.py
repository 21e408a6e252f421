"""The repository: everything surepoint keeps on storage, and the engine that reads and writes it.

Format (docs/repository-format.md is the byte-level reference; code and document change together)
    A repository is a flat namespace of objects on a storage backend (surepoint/storage/):

    config                  plain JSON: identity, chunk size, compression, wrapped keys (crypto.py)
    chunks/xx/<id>          one chunk of disk data, content-addressed (chunks.py)
    indexes/<rp>.<disk>     a fixed index: one chunk id per fixed-size piece of a disk (fixed_index.py)
    restorepoints/<rp>      a restore-point manifest; its presence commits the point (manifest.py)
    logs/<series>/<w>/<f>   a record of one shipped transaction-log file, stored as chunks (logstore.py)
    locks/<id>              who works on the repository, and since when (locks.py)
    trash/<id>              a chunk garbage collection is about to delete (gc.py)
    quarantine/<id>         a chunk verify --repair found damaged, set aside (repair.py)

    Chunks, indexes, manifests and log records are wrapped in one envelope (envelope.py): a
    header naming the kind, compression and cipher, then either a BLAKE3 checksum or AEAD
    encryption whose associated data binds the object to its name. Every restore point is a full image: forgetting
    one never damages another. repository.py ties these together (create, open, resolve, commit);
    backup.py, restore.py, verify.py, repair.py, gc.py and retention.py are the operations on top.

Layers
    This package imports only surepoint.storage, surepoint.errors, the shared helpers
    (surepoint.timestamps, surepoint.processes) and libraries (the import contract in
    pyproject.toml keeps it so). Disk sources are described by the `DiskSource` protocol
    (source.py); where they come from (image files, NBD, VMs) is the business of the layers
    above. Verification returns a report; recording it
    in the catalog is a job (surepoint/jobs/verify.py).

Locking: which operations may run at the same time, and what makes that safe
    Lock kinds and their conflicts are in locks.CONFLICTS. Readers (`restore`, `mount`, `instant`,
    `lab`, `copy`, `verify`) name the restore points they read in their lock. `backup` and readers
    run beside each other and beside `gc`; `forget` excludes `forget`, `gc` excludes `gc`,
    `exclusive` excludes everything. A conflicting lock makes the newcomer fail at once
    (RepositoryLocked), with one exception: a reader that finds a `forget` running waits for it
    (locks.reader_lock, up to a minute). Where two operations may overlap, this is why it is safe:

    backup  / backup   Chunks are named by their content and put atomically, so two backups
                       writing the same chunk write the same bytes. Each backup writes its own
                       indexes and manifest under a fresh random restore-point id.
    backup  / gc       A backup takes its lock first, then touches every chunk it reuses and
                       writes every other one, so all its chunks have an mtime after its lock's
                       `created`. gc deletes only unreferenced objects older than
                       min(gc start, oldest live backup lock) - margin, moves a chunk to trash/
                       and looks at its mtime again before deleting it (a touch in between sends
                       it back), and a backup whose touch finds a chunk gone writes it again.
    reader  / forget   Each writes its lock, then looks at the other's (so of two starting at once,
                       at least one sees the other). forget keeps every point a live reader names
                       (`forget` exits 1 naming the reader; the other points are forgotten); a
                       reader that sees a live forget waits until it ends, then checks that its
                       points still exist (Repository.reading: "removed by a concurrent forget"
                       if not, before anything is read).
    reader  / gc       gc deletes only what no manifest refers to, and a held point keeps its
                       manifest (reader / forget): every chunk it needs stays. Chunks are checked
                       against their id when read; should a point vanish anyway (a forget by a
                       client without reader locks), the reader says "removed by a concurrent
                       forget", never damage, and never returns wrong bytes.
                       The mount server (mount, instant recovery, lab) takes its lock in the
                       server process and holds it for as long as it serves; its refresh thread
                       renews it, and a dead server's lock is stale the usual way.
    verify             A reader (above): the points it checks are held, so a chunk it finds
                       missing is damage, never a point that a forget and a gc pulled away; a
                       point forgotten before its lock was in place is reported as such.
    forget  / backup   forget deletes manifests first, then their indexes; a backup whose base
                       point is forgotten reads its disk in full (its base index is gone) or
                       re-reads any base chunk that `touch` no longer finds.
    forget  / forget   Excluded by the `forget` lock (two retention runs would race on the same
                       decisions).
    gc      / gc       Excluded by the `gc` lock.
    logs    / gc       Log shipping writes chunks, then a record, under a `backup` lock: as
                       backup / gc; gc also keeps every chunk a log record lists.
    copy               A copy job (surepoint/jobs/copy.py) holds a `copy` reader lock on its
                       source naming the points it copies (reader / forget, reader / gc: gc and
                       backups on the source go on), and a `backup` lock on its target, where it
                       writes like a backup (backup / gc).

    A reader that cannot write its lock object (a full or read-only repository)
    still checks for conflicting locks and runs without one, so data can always be read back.
"""
