"""File-level restore: copy files out of a mounted restore point, to a local directory or into a VM.

Over 500 lines because the safety rules below are one walk: splitting the host and in-VM
copies apart would duplicate every check on untrusted names.

Everything read comes from an untrusted guest filesystem, and nothing may be written outside the
target directory:

* A requested path may not contain `..`. Symlinks in the middle of a requested path are resolved
  the way the guest would see them, but inside the guest's filesystem (an absolute target starts
  at the filesystem's root, `..` never climbs above it); the last component is never followed.
* Names read from the guest are single path components: anything else (`..`, a `/`, a NUL) is
  refused.
* Locally, every destination is reached from a directory file descriptor of --to, one component at
  a time, with O_NOFOLLOW: a symlink in the destination (restored a moment ago, or there before)
  is never followed. Symlinks are restored as symlinks.
* Into a VM (qemu-guest-agent), program arguments are argv vectors, never shell strings; a file is
  written under a random temporary name and renamed into place (`mv -T`, which replaces a symlink
  instead of following it), and each directory is checked with `realpath` before use.

Metadata (owner, group, mode, times, extended attributes locally) is kept; sparse files keep
their holes locally (SEEK_DATA / SEEK_HOLE). Hard links are restored as separate copies.

What a guest's files may do to the host that restores them:

* Owners are kept as the guest's numeric ids, never mapped by name: uid 1000 in the guest is
  whoever is uid 1000 on the host (or in the target VM). Only root can set them; otherwise the
  files belong to the user running the restore (one warning says so).
* Set-uid and set-gid bits are cleared on restored files unless the caller asks to keep them
  (`keep_setuid`, the command's --keep-setuid): a guest's set-uid-root program must not become one
  on the host. Each cleared file is listed as a warning.
* A local --to that does not exist is created 0700, so what lands there (a copy of the guest's
  /etc/shadow, its private keys) is not readable by other local users; an existing --to keeps its
  mode, with a warning when other users can enter it.
* Every name in a message is escaped (surepoint.text.printable): a guest's file name never writes
  control characters or escape sequences to the operator's terminal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from surepoint.errors import InvalidArgument, SurepointError
from surepoint.interrupt import checkpoint
from surepoint.text import printable

COPY_BLOCK = 1 << 20
SET_ID_BITS = stat.S_ISUID | stat.S_ISGID
MAX_SYMLINKS = 40
MAX_DEPTH = 512


@dataclass
class CopyReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0  # data bytes copied
    sparse_bytes: int = 0  # bytes left as holes
    skipped: list[str] = field(default_factory=list)  # entries not copied by design (devices, sockets...)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def normalize_request(path: str) -> list[str]:
    """The components of a path inside the guest filesystem; `..` is refused."""
    if "\0" in path:
        raise InvalidArgument(f"{printable(path)}: a path cannot contain NUL")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(
            f"{printable(path)}: '..' is not allowed in a path to restore (give the path from the filesystem root)"
        )
    return parts


def resolve_source(root: str, parts: list[str]) -> list[str]:
    """Resolve `parts` inside the filesystem mounted at `root`, as a chroot would; the last component stays."""
    resolved: list[str] = []
    pending = list(parts)
    links = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = [*resolved, name]
        if not pending:
            return candidate
        full = os.path.join(root, *candidate)
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/" + "/".join(candidate))
            target = os.readlink(full)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
        elif stat.S_ISDIR(st.st_mode):
            resolved = candidate
        else:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/" + "/".join(candidate))
    return resolved


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"unsafe file name {printable(name)!r} in the restore point")


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the data of a file, holes left out (the whole file when holes are not reported)."""
    ranges = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole from pos to the end
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, min(end, size)))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)] if size else []
        raise
    return ranges


# -- destinations -----------------------------------------------------------------------------


class LocalTarget:
    """Writes below a local directory through directory file descriptors, never following a symlink."""

    def __init__(self, directory: str, overwrite: bool, report: CopyReport, keep_setuid: bool = False) -> None:
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # whatever the umask
        except FileExistsError:
            pass
        self.root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.directory = directory
        self.overwrite = overwrite
        self.keep_setuid = keep_setuid
        self.report = report
        self._warned_owner = False
        if stat.S_IMODE(os.fstat(self.root_fd).st_mode) & 0o077:
            report.warnings.append(
                f"{printable(directory)} can be entered by other users: restored files keep the guest's modes"
            )

    def close(self) -> None:
        os.close(self.root_fd)

    def root(self) -> int:
        return os.dup(self.root_fd)

    def release(self, handle: int) -> None:
        os.close(handle)

    def open_dir(self, parent: int, name: str, rel: str) -> tuple[int, bool]:
        """(fd of directory `name` in `parent`, created); an existing symlink or file there is an error."""
        created = False
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent), created
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OSError(exc.errno, f"{rel} exists in the target and is not a directory (not followed)") from None
            raise

    def _make_room(self, parent: int, name: str, rel: str) -> None:
        """An entry is in the way: replace it with --overwrite (never a directory), else refuse."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) or not self.overwrite:
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "there"
            raise FileExistsError(errno.EEXIST, f"{rel} is already {what} in the target (use --overwrite)")
        os.unlink(name, dir_fd=parent)

    def write_file(self, parent: int, name: str, rel: str, src_fd: int, st: os.stat_result) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, rel)
            fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            for start, end in data_ranges(src_fd, st.st_size):
                pos = start
                while pos < end:
                    block = os.pread(src_fd, min(COPY_BLOCK, end - pos), pos)
                    if not block:
                        raise OSError(errno.EIO, f"{rel}: file ended early at {pos} bytes")
                    written = 0
                    while written < len(block):
                        written += os.pwrite(fd, block[written:], pos + written)
                    pos += len(block)
                    self.report.bytes += len(block)
            os.ftruncate(fd, st.st_size)
            self.report.sparse_bytes += st.st_size - sum(e - s for s, e in data_ranges(fd, st.st_size))
            self._copy_xattrs(src_fd, fd, rel)
            self._set_metadata_fd(fd, st, rel, regular=True)
        except BaseException:  # failed or interrupted: no partial file is left under its name
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=parent)
            raise
        finally:
            os.close(fd)

    def make_symlink(self, parent: int, name: str, rel: str, target: str, st: os.stat_result) -> None:
        try:
            os.symlink(target, name, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, rel)
            os.symlink(target, name, dir_fd=parent)
        try:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=parent, follow_symlinks=False)
        except PermissionError:
            self._owner_warning()
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent, follow_symlinks=False)

    def finish_dir(self, handle: int, rel: str, st: os.stat_result, src_fd: int | None = None) -> None:
        if src_fd is not None:
            self._copy_xattrs(src_fd, handle, rel)
        self._set_metadata_fd(handle, st, rel)

    def _set_metadata_fd(self, fd: int, st: os.stat_result, rel: str, regular: bool = False) -> None:
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:
            self._owner_warning()
        mode = _restored_mode(st, rel, regular, self.keep_setuid, self.report)
        os.fchmod(fd, mode)  # after chown, which clears set-id bits
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _copy_xattrs(self, src_fd: int, dst_fd: int, rel: str) -> None:
        try:
            names = os.listxattr(src_fd)
        except OSError:
            return
        for attr in names:
            try:
                os.setxattr(dst_fd, attr, os.getxattr(src_fd, attr))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    self.report.warnings.append(
                        f"{rel}: extended attribute {printable(attr)} not restored: {exc.strerror}"
                    )

    def _owner_warning(self) -> None:
        if not self._warned_owner:
            self._warned_owner = True
            self.report.warnings.append("owners not restored: only root can set them")


class GuestTarget:
    """Writes below a directory of a running VM through qemu-guest-agent (handles are guest paths)."""

    def __init__(self, agent, directory: str, overwrite: bool, report: CopyReport, keep_setuid: bool = False) -> None:
        if not directory.startswith("/"):
            raise InvalidArgument(f"--to {printable(directory)}: give an absolute path inside the VM")
        self.agent = agent
        self.directory = posixpath.normpath(directory)
        self.overwrite = overwrite
        self.keep_setuid = keep_setuid
        self.report = report
        self._checked: set[str] = set()
        self._run(["mkdir", "-p", "--", self.directory])
        self._check_dir(self.directory, allow_symlinks=True)

    def close(self) -> None:
        pass

    def _run(self, argv: list[str], *, check: bool = True):
        result = self.agent.exec(argv, timeout=120.0)
        if check and not result.ok:
            detail = printable(result.stderr.decode(errors="replace").strip()) or f"exit code {result.exitcode}"
            raise OSError(errno.EIO, f"in the VM, {argv[0]} failed: {detail}")
        return result

    def _check_dir(self, path: str, allow_symlinks: bool = False) -> None:
        """The directory exists and (below --to) no component of it is a symlink."""
        real = self._run(["realpath", "-e", "--", path]).stdout.decode(errors="surrogateescape").rstrip("\n")
        if not allow_symlinks and real != path:
            raise OSError(
                errno.ELOOP, f"{printable(path)} in the VM leads through a symlink to {printable(real)}; not followed"
            )
        if allow_symlinks:
            self.directory = real
        self._checked.add(path)

    def root(self) -> str:
        return self.directory

    def release(self, handle: str) -> None:
        pass

    def open_dir(self, parent: str, name: str, rel: str) -> tuple[str, bool]:
        path = posixpath.join(parent, name)
        exists = self._exists(path)
        if not exists:
            self._run(["mkdir", "-m", "700", "--", path])
        self._check_dir(path)
        return path, not exists

    def _exists(self, path: str) -> bool:
        return self._run(["test", "-e", path], check=False).ok or self._run(["test", "-L", path], check=False).ok

    def _place(self, tmp: str, path: str, rel: str) -> None:
        if self._exists(path) and (not self.overwrite or self._run(["test", "-d", path], check=False).ok):
            self._run(["rm", "-f", "--", tmp], check=False)
            raise FileExistsError(errno.EEXIST, f"{rel} is already there in the VM (use --overwrite)")
        self._run(["mv", "-f", "-T", "--", tmp, path])

    def _tmp(self, parent: str) -> str:
        return posixpath.join(parent, f".surepoint-restore.{secrets.token_hex(8)}")

    def write_file(self, parent: str, name: str, rel: str, src_fd: int, st: os.stat_result) -> None:
        tmp = self._tmp(parent)
        # qemu-ga makes the files guest-file-open creates readable and writable by every user of the
        # guest (0666, whatever its umask): the file is made here first, private, and only opened
        # by the agent, so no other user can read or change the restored bytes before their mode is set.
        self._run(["install", "-m", "600", "/dev/null", tmp])
        try:
            handle = self.agent.file_open(tmp, "r+b")
            try:
                pos = 0
                while pos < st.st_size:
                    block = os.pread(src_fd, min(COPY_BLOCK, st.st_size - pos), pos)
                    if not block:
                        raise OSError(errno.EIO, f"{rel}: file ended early at {pos} bytes")
                    view = memoryview(block)
                    while view:
                        written = self.agent.file_write(handle, bytes(view))
                        if written <= 0:
                            raise OSError(errno.EIO, f"{rel}: guest-file-write wrote nothing")
                        view = view[written:]
                    pos += len(block)
                    self.report.bytes += len(block)
            finally:
                self.agent.file_close(handle)
        except BaseException:
            self._run(["rm", "-f", "--", tmp], check=False)  # no half-written temporary left beside the file
            raise
        self._set_metadata(tmp, st, symlink=False, rel=rel, regular=True)
        self._place(tmp, posixpath.join(parent, name), rel)

    def make_symlink(self, parent: str, name: str, rel: str, target: str, st: os.stat_result) -> None:
        tmp = self._tmp(parent)
        self._run(["ln", "-s", "--", target, tmp])
        self._set_metadata(tmp, st, symlink=True)
        self._place(tmp, posixpath.join(parent, name), rel)

    def finish_dir(self, handle: str, rel: str, st: os.stat_result, src_fd: int | None = None) -> None:
        self._set_metadata(handle, st, symlink=False)

    def _set_metadata(self, path: str, st: os.stat_result, *, symlink: bool, rel: str = "", regular: bool = False):
        self._run(["chown", "-h", f"{st.st_uid}:{st.st_gid}", "--", path])
        if not symlink:
            mode = _restored_mode(st, rel, regular, self.keep_setuid, self.report)
            self._run(["chmod", f"{mode:o}", "--", path])
        stamp = f"@{st.st_mtime_ns // 1_000_000_000}.{st.st_mtime_ns % 1_000_000_000:09d}"
        self._run(["touch", "-h", "-d", stamp, "--", path])


def _restored_mode(st: os.stat_result, rel: str, regular: bool, keep_setuid: bool, report: CopyReport) -> int:
    """The permission bits a restored entry gets: the source's, without set-uid/set-gid on files unless kept.

    A directory keeps set-gid (it only makes new files inherit the group)."""
    mode = stat.S_IMODE(st.st_mode)
    if regular and mode & SET_ID_BITS and not keep_setuid:
        kept = mode & ~SET_ID_BITS
        report.warnings.append(f"{rel}: set-uid/set-gid bits cleared (mode {mode:04o} restored as {kept:04o})")
        mode &= ~SET_ID_BITS
    return mode


# -- the walk ---------------------------------------------------------------------------------


def restore_files(
    root: str,
    requests: list[str],
    target: LocalTarget | GuestTarget,
    report: CopyReport,
    progress: Callable[[str], None] | None = None,
) -> CopyReport:
    """Copy each requested path of the filesystem mounted at `root` to the same path below the target."""
    wanted = [(request, normalize_request(request)) for request in requests]
    for request, parts in wanted:
        try:
            resolved = resolve_source(root, parts)
            src = os.path.join(root, *resolved)
            st = os.lstat(src)
        except OSError as exc:
            report.errors.append(f"{printable(request)}: {exc.strerror or exc} in the restore point")
            continue
        rel = printable("/" + "/".join(resolved))  # `rel` names an entry in messages only: always escaped
        if progress:
            progress(rel)
        try:
            handles, created = _parent_dirs(root, resolved[:-1], target)
        except OSError as exc:
            report.errors.append(f"{rel}: {exc.strerror or exc}")
            continue
        try:
            if not resolved:  # the whole filesystem: its contents go straight into the target
                _copy_children(src, handles[-1], rel, target, report, 0)
            else:
                _copy_entry(src, st, handles[-1], resolved[-1], rel, target, report, 0)
        finally:
            # Directories created on the way get their owner, mode and times from the source.
            for handle, dir_rel, dir_st in reversed(created):
                _finish(target, handle, dir_rel, dir_st, None, report)
            for handle in handles:
                target.release(handle)
    return report


def _parent_dirs(root: str, parts: list[str], target) -> tuple[list, list]:
    """Open (creating) the target directories of `parts`: (handles from the root down, created ones)."""
    handles = [target.root()]
    created = []
    try:
        for i, name in enumerate(parts):
            rel = printable("/" + "/".join(parts[: i + 1]))
            child, was_created = target.open_dir(handles[-1], name, rel)
            handles.append(child)
            if was_created:
                created.append((child, rel, os.lstat(os.path.join(root, *parts[: i + 1]))))
    except BaseException:
        for handle in handles:
            target.release(handle)
        raise
    return handles, created


def _finish(target, handle, rel: str, st: os.stat_result, src_fd: int | None, report: CopyReport) -> None:
    try:
        target.finish_dir(handle, rel, st, src_fd)
    except OSError as exc:
        report.errors.append(f"{rel}: metadata not restored: {exc.strerror or exc}")


def _copy_entry(src: str, st: os.stat_result, parent, name: str, rel: str, target, report: CopyReport, depth: int):
    try:
        _check_name(name)
    except ValueError as exc:
        report.errors.append(f"{rel}: {exc}; skipped")
        return
    mode = st.st_mode
    try:
        if stat.S_ISLNK(mode):
            target.make_symlink(parent, name, rel, os.readlink(src), st)
            report.symlinks += 1
        elif stat.S_ISREG(mode):
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                target.write_file(parent, name, rel, fd, st)
            finally:
                os.close(fd)
            report.files += 1
            checkpoint("restore-file")
        elif stat.S_ISDIR(mode):
            if depth >= MAX_DEPTH:
                report.errors.append(f"{rel}: directories nested deeper than {MAX_DEPTH}; skipped")
                return
            handle, _created = target.open_dir(parent, name, rel)
            try:
                _copy_children(src, handle, rel, target, report, depth + 1)
                src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    _finish(target, handle, rel, st, src_fd, report)
                finally:
                    os.close(src_fd)
            finally:
                target.release(handle)
            report.dirs += 1
        else:
            kind = (
                "device"
                if stat.S_ISBLK(mode) or stat.S_ISCHR(mode)
                else "FIFO"
                if stat.S_ISFIFO(mode)
                else "socket"
                if stat.S_ISSOCK(mode)
                else "special file"
            )
            report.skipped.append(f"{rel}: {kind}, not restored")
    except OSError as exc:
        report.errors.append(f"{rel}: {exc.strerror or exc}")


def _copy_children(src: str, handle, rel: str, target, report: CopyReport, depth: int) -> None:
    try:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        report.errors.append(f"{rel}: cannot list: {exc.strerror or exc}")
        return
    for entry in entries:
        child_rel = posixpath.join(rel, printable(entry.name))
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            report.errors.append(f"{child_rel}: {exc.strerror or exc}")
            continue
        _copy_entry(entry.path, st, handle, entry.name, child_rel, target, report, depth)


def pick_volume(mounts: list[dict], disk: int | None, partition: str | None) -> dict:
    """The mounted filesystem a file restore reads: chosen by --disk/--partition, or the only one."""
    candidates = [m for m in mounts if disk is None or m["disk"] == disk]
    if partition is not None:
        wanted = partition if partition == "fs" or partition.startswith("part") else f"part{partition}"
        candidates = [m for m in candidates if m["volume"] == wanted]
    if len(candidates) == 1:
        return candidates[0]
    choices = ", ".join(
        f"--disk {m['disk']} --partition {m['volume'].removeprefix('part')} ({printable(m['fstype'])})" for m in mounts
    )
    if not candidates:
        raise InvalidArgument(f"no mounted filesystem matches (mounted: {choices or 'none'})")
    raise SurepointError(f"the restore point has several filesystems: choose one of {choices}")
