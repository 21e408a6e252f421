"""The `surepoint` command line: repository, backup, restore, verify and retention commands."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from surepoint import __version__
from surepoint.catalog import Catalog, default_catalog_path
from surepoint.errors import (
    DamagedData,
    RepositoryLocked,
    RepositoryNotFound,
    RestorePointNotFound,
    SurepointError,
    UnreadableRestorePoints,
    UsageError,
)
from surepoint.progress import byte_progress, count_progress
from surepoint.repo.backup import BackupRequest, run_backup
from surepoint.repo.gc import MARGIN_SECONDS, collect_garbage
from surepoint.repo.locks import read_locks, remove_stale_locks
from surepoint.repo.manifest import RestorePoint
from surepoint.repo.repository import DEFAULT_CHUNK_SIZE, Repository, open_backend
from surepoint.repo.restore import restore_disk
from surepoint.repo.retention import Candidate, Policy, apply_policy
from surepoint.repo.verify import verify as run_verify
from surepoint.sources import FileDiskSource

EXIT_DAMAGE = 3

app = typer.Typer(
    help="Image-level backup of disks and virtual machines into a deduplicating, verifiable repository.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Wide tables when piped, so ids and dates are never cut short in logs.
# No markup: names, paths and messages come from users and guests and are printed as they are.
out = Console(width=None if sys.stdout.isatty() else 160, markup=False, highlight=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True, markup=False, highlight=False)


def _say_error(message: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", message))


# What to do next, by error class: the core names the problem, the command line gives the advice.
HINTS: dict[type[SurepointError], str] = {
    RepositoryNotFound: "check --repo, or create one with `surepoint init`",
    RestorePointNotFound: "see `surepoint list`",
    RepositoryLocked: "wait for it to finish, or run `surepoint unlock` if that process is gone",
    UnreadableRestorePoints: "run `surepoint verify`, then forget or repair those restore points",
}


def _error_with_hint(exc: SurepointError) -> str:
    """The error's message and the advice for it, on one line (the error line is the last on stderr)."""
    hint = exc.hint or next((h for cls, h in HINTS.items() if isinstance(exc, cls)), None)
    return f"{exc}; {hint}" if hint else str(exc)


def _say_warning(message: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", message))


RepoOption = Annotated[
    str | None,
    typer.Option("--repo", "-r", envvar="SUREPOINT_REPO", help="Repository path.", show_envvar=True),
]
PassFileOption = Annotated[
    str | None,
    typer.Option("--passphrase-file", envvar="SUREPOINT_PASSPHRASE_FILE", help="Read the passphrase from a file."),
]
CatalogOption = Annotated[
    str | None, typer.Option("--catalog", envvar="SUREPOINT_CATALOG", help="Catalog database (SQLite) path.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class Context:
    """What every command needs: where the repository is and how to get its passphrase."""

    def __init__(self, repo: str | None, passphrase_file: str | None, catalog: str | None) -> None:
        self.repo_location = repo
        self.passphrase_file = passphrase_file
        self.catalog_path = catalog or default_catalog_path()
        self._catalog: Catalog | None = None

    def location(self) -> str:
        if not self.repo_location:
            raise UsageError("no repository given: pass --repo PATH or set SUREPOINT_REPO")
        return self.repo_location

    def passphrase(self, *, confirm: bool = False) -> str:
        env = os.environ.get("SUREPOINT_PASSPHRASE")
        if env is not None:
            return env
        if self.passphrase_file:
            try:
                with open(self.passphrase_file) as f:
                    return f.read().rstrip("\n")
            except OSError as exc:
                raise UsageError(f"cannot read passphrase file {self.passphrase_file}: {exc.strerror}") from None
        if sys.stdin.isatty():
            first = getpass.getpass("repository passphrase: ")
            if confirm and getpass.getpass("repeat passphrase: ") != first:
                raise UsageError("the passphrases do not match")
            return first
        raise UsageError("this repository needs a passphrase: set SUREPOINT_PASSPHRASE or pass --passphrase-file")

    def open_repository(self) -> Repository:
        return Repository.open(open_backend(self.location()), self.passphrase)

    def catalog(self) -> Catalog:
        if self._catalog is None:
            try:
                self._catalog = Catalog(self.catalog_path)
            except Exception as exc:  # noqa: BLE001 - sqlite3 and OS errors alike
                raise SurepointError(f"cannot open catalog {self.catalog_path}: {exc}") from None
        return self._catalog


@app.callback()
def _global(
    ctx: typer.Context,
    repo: RepoOption = None,
    passphrase_file: PassFileOption = None,
    catalog: CatalogOption = None,
) -> None:
    ctx.obj = Context(repo, passphrase_file, catalog)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"surepoint {__version__}")


@app.command()
def init(
    ctx: typer.Context,
    encryption: Annotated[
        str, typer.Option(help="none, aes-256-gcm or chacha20-poly1305.", case_sensitive=False)
    ] = "aes-256-gcm",
    chunk_size: Annotated[int, typer.Option(help="Chunk size in bytes (power of two).")] = DEFAULT_CHUNK_SIZE,
    compression_level: Annotated[int, typer.Option(help="zstd level.", min=1, max=19)] = 3,
) -> None:
    """Create a new repository."""
    c: Context = ctx.obj
    encryption = encryption.lower()
    if encryption not in ("none", "aes-256-gcm", "chacha20-poly1305"):
        raise UsageError(f"unknown encryption {encryption!r}: choose none, aes-256-gcm or chacha20-poly1305")
    passphrase = c.passphrase(confirm=True) if encryption != "none" else None
    backend = open_backend(c.location(), create=True)
    repo = Repository.create(
        backend,
        encryption=encryption,
        passphrase=passphrase,
        chunk_size=chunk_size,
        compression_level=compression_level,
    )
    out.print(f"created repository {repo.id} at {backend.location} (encryption: {repo.encryption})")


@app.command()
def backup(
    ctx: typer.Context,
    sources: Annotated[
        list[str] | None, typer.Argument(help="Disk image files or block devices (one restore point).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the backed-up system; links incrementals.")] = None,
    job: Annotated[
        str | None, typer.Option("--job", help="Job file (TOML) with sources, writers and log policy.")
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Ignore the previous restore point.")] = False,
    parallel: Annotated[int, typer.Option(help="VMs backed up at once (backup vm ...).", min=1)] = 2,
    inventory: Annotated[
        str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory file (TOML).")
    ] = None,
    fallback: Annotated[str, typer.Option(help="try: fall back to crash consistency; require: fail.")] = "try",
    quiesce: Annotated[bool, typer.Option(help="Freeze guest filesystems through the guest agent.")] = True,
    freeze_timeout: Annotated[float, typer.Option(help="Seconds the guest may stay frozen.", min=1)] = 20.0,
    as_json: JsonOption = False,
) -> None:
    """Back up disk images or block devices as one restore point (application-aware with --job).

    `surepoint backup vm NAME...` backs up running QEMU VMs (found by name from their QEMU
    processes or --inventory), several in parallel.
    """
    c: Context = ctx.obj
    if sources and sources[0] == "vm":
        _backup_vms(c, sources[1:], parallel, inventory, fallback, quiesce, full, as_json, freeze_timeout)
        return
    if bool(job) == bool(sources):
        raise UsageError("give either SOURCE... or --job FILE")
    point = _backup_job(c, job) if job else _backup_sources(c, sources or [], name, full)
    if as_json:
        _print_json(_point_json(point, {"state": "unverified", "integrity": "unverified", "recovery": "unverified"}))
        return
    new = sum(d.new_bytes for d in point.disks)
    stored = sum(d.stored_bytes for d in point.disks)
    read = sum(d.read_bytes for d in point.disks)
    out.print(
        f"restore point {point.id} of {point.name}: {_human(point.size)} disk, read {_human(read)}, "
        f"new data {_human(new)} stored as {_human(stored)}, {point.consistency}-consistent, "
        f"{point.duration_seconds:.1f} s"
    )


def _backup_sources(c: Context, sources: list[str], name: str | None, full: bool) -> RestorePoint:
    repo = c.open_repository()
    catalog = c.catalog()
    disk_sources = []
    try:
        for path in sources:
            disk_sources.append(FileDiskSource(path))
        name = name or disk_sources[0].name
        base = None if full else repo.latest_named(name)
        request = BackupRequest(
            name=name,
            sources=disk_sources,
            source_info={"kind": "files", "paths": [os.path.abspath(p) for p in sources]},
            base=base,
            restore_point_id=repo.new_restore_point_id(),
        )
        catalog.add_event(
            repo.id, "job", "start", "ok", f"backup of {name}", source=name, restore_point=request.restore_point_id
        )
        total = sum(s.size for s in disk_sources)
        try:
            with byte_progress(err, f"backup {name}", total) as advance:
                point = run_backup(repo, request, progress=advance, log=lambda m: err.print(f"  {m}"))
        except SurepointError as exc:
            catalog.add_event(
                repo.id, "job", "finish", "failed", str(exc), source=name, restore_point=request.restore_point_id
            )
            raise
    finally:
        for s in disk_sources:
            s.close()
    catalog.add_event(
        repo.id, "job", "commit", "ok", f"restore point {point.id} committed", restore_point=point.id, source=name
    )
    return point


def _backup_vms(
    c: Context,
    names: list[str],
    parallel: int,
    inventory: str | None,
    fallback: str,
    quiesce: bool,
    full: bool,
    as_json: bool,
    freeze_timeout: float = 20.0,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from surepoint.jobs.vm_backup import VmJobOptions, backup_vm
    from surepoint.vm.inventory import find_vm

    if not names:
        raise UsageError("name at least one VM: surepoint backup vm NAME...")
    if fallback not in ("try", "require"):
        raise UsageError("--fallback must be try or require")
    repo = c.open_repository()
    catalog = c.catalog()
    options = VmJobOptions(fallback=fallback, quiesce=quiesce, full=full, freeze_timeout=freeze_timeout)

    def one(name: str) -> dict:
        try:
            vm = find_vm(name, inventory)
            result = backup_vm(repo, catalog, vm, options, log=lambda m: err.print(f"  {m}"))
        except SurepointError as exc:
            return {"vm": name, "status": "failed", "error": str(exc)}
        point = result.restore_point
        return {
            "vm": name,
            "status": "warning" if result.outcome.failures else "ok",
            "restore_point": point.id,
            "consistency": point.consistency,
            "cbt": result.cbt,
            "read_bytes": sum(d.read_bytes for d in point.disks),
            "stored_bytes": sum(d.stored_bytes for d in point.disks),
            "size": point.size,
            "duration_seconds": point.duration_seconds,
            "notes": result.notes + result.outcome.failures,
        }

    with ThreadPoolExecutor(min(parallel, len(names))) as pool:
        results = list(pool.map(one, names))
    if as_json:
        _print_json({"vms": results})
    else:
        table = Table(title="VM backup")
        for col in ("vm", "status", "restore point", "consistency", "read", "stored", "notes"):
            table.add_column(col)
        for r in results:
            table.add_row(
                r["vm"],
                r["status"],
                r.get("restore_point", ""),
                r.get("consistency", ""),
                _human(r["read_bytes"]) if "read_bytes" in r else "",
                _human(r["stored_bytes"]) if "stored_bytes" in r else "",
                r.get("error") or "; ".join([r.get("cbt", "")] + r.get("notes", [])),
            )
        out.print(table)
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        _say_error(f"backup of VM {r['vm']} failed: {r['error']}")
    if failed:
        raise typer.Exit(1)


def _backup_vm_job(c: Context, repo: Repository, job) -> RestorePoint:
    from surepoint.jobs.vm_backup import VmJobOptions, backup_vm
    from surepoint.vm.inventory import find_vm

    options = VmJobOptions(fallback=job.fallback, freeze_timeout=job.freeze_timeout, writers=job.writers, logs=job.logs)
    vm = find_vm(job.vm, os.environ.get("SUREPOINT_VM_INVENTORY"))
    result = backup_vm(repo, c.catalog(), vm, options, log=lambda m: err.print(f"  {m}"))
    if result.outcome.failures:
        _say_warning(f"{result.restore_point.consistency}-consistent only: " + "; ".join(result.outcome.failures))
    return result.restore_point


def _backup_job(c: Context, job_file: str) -> RestorePoint:
    from surepoint.jobs.config import load_job
    from surepoint.jobs.host_backup import run_host_job

    job = load_job(job_file)
    repo = c.open_repository()
    if job.vm:
        return _backup_vm_job(c, repo, job)
    # The bar can only be drawn once the job knows the size (after the snapshot); it closes with the job.
    with contextlib.ExitStack() as bars:

        def progress_factory(total: int) -> Callable[[int], None]:
            return bars.enter_context(byte_progress(err, f"backup {job.name}", total))

        result = run_host_job(
            repo, c.catalog(), job, progress_factory=progress_factory, log=lambda m: err.print(f"  {m}")
        )
    if result.outcome.failures:
        _say_warning(f"{result.restore_point.consistency}-consistent only: " + "; ".join(result.outcome.failures))
    return result.restore_point


def _point_json(point: RestorePoint, verification: dict[str, str]) -> dict:
    data = asdict(point)
    data.update(verification)  # state, integrity, recovery
    data["size"] = point.size
    return data


def _verification(catalog: Catalog, repo: Repository, point: RestorePoint) -> dict[str, str]:
    return catalog.verification_summary(repo.id, point.id, bootable=point.bootable)


@app.command("list")
def list_points(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(help="Only restore points of this name.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List restore points, oldest first."""
    c: Context = ctx.obj
    repo = c.open_repository()
    catalog = c.catalog()
    points = [p for p in repo.list_restore_points() if name is None or p.name == name]
    if as_json:
        _print_json(
            {
                "repository": repo.id,
                "restore_points": [_point_json(p, _verification(catalog, repo, p)) for p in points],
                "damaged_manifests": repo.damaged_manifests,
            }
        )
        return
    table = Table(title=f"restore points in {repo.backend.location}")
    for col in ("id", "name", "created (UTC)", "disks", "size", "consistency", "state", "new data"):
        table.add_column(col)
    for p in points:
        table.add_row(
            p.id,
            p.name,
            p.created[:19].replace("T", " "),
            str(len(p.disks)),
            _human(p.size),
            p.consistency,
            _verification(catalog, repo, p)["state"],
            _human(sum(d.stored_bytes for d in p.disks)),
        )
    out.print(table)
    for m in repo.damaged_manifests:
        _say_error(f"damaged manifest {m}: run `surepoint verify`")


@app.command()
def show(ctx: typer.Context, restore_point: str, as_json: JsonOption = False) -> None:
    """Show one restore point in full."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    data = _point_json(point, _verification(c.catalog(), repo, point))
    if as_json:
        _print_json(data)
    else:
        out.print_json(json.dumps(data))


@app.command()
def restore(
    ctx: typer.Context,
    restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest.")],
    to: Annotated[str, typer.Option("--to", help="Target file or block device.")],
    disk: Annotated[int, typer.Option(help="Disk number within the restore point.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing target file.")] = False,
) -> None:
    """Restore one disk of a restore point to a file or block device."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    size = next((d.size for d in point.disks if d.number == disk), 0)
    with byte_progress(err, f"restore {point.id} disk {disk}", size) as advance:
        result = restore_disk(repo, point, disk, to, overwrite=overwrite, progress=advance)
    c.catalog().add_event(repo.id, "restore", "data", "ok", f"disk {disk} restored to {to}", restore_point=point.id)
    out.print(
        f"restored disk {disk} of {point.id} ({_human(result.size)}) to {result.target}; "
        f"{_human(result.sparse_bytes)} left sparse"
    )


@app.command()
def verify(
    ctx: typer.Context,
    restore_point: Annotated[str | None, typer.Argument(help="Only this restore point (default: all).")] = None,
    sample: Annotated[
        float | None,
        typer.Option(help="Check only this percentage of chunks, chosen at random.", min=0.01, max=100),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Skip chunks already verified at or after this date (YYYY-MM-DD[THH:MM])."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-read and check stored chunks; report damaged restore points and byte ranges (exit 3 on damage)."""
    c: Context = ctx.obj
    repo = c.open_repository()
    points = [repo.resolve(restore_point)] if restore_point else repo.list_restore_points()
    since_iso = _parse_since(since) if since else None
    with count_progress(err, "verify chunks") as (set_total, advance):
        report = run_verify(
            repo,
            points,
            c.catalog(),
            sample=(sample / 100) if sample else None,
            since=since_iso,
            progress=advance,
            on_plan=set_total,
        )
    if as_json:
        _print_json(report.to_dict())
    else:
        out.print(
            f"checked {report.checked_chunks} chunks ({report.skipped_chunks} skipped as recently verified), "
            f"{report.damaged_chunks} damaged"
        )
        for p in report.points:
            colour = {"verified": "green", "damaged": "red"}.get(p.state, "yellow")
            out.print(Text.assemble(f"  {p.id} {p.name}: ", (p.state, colour)))
            for r in p.damaged:
                out.print(f"    disk {r.disk} bytes {r.offset}-{r.offset + r.length - 1}: {r.reason}")
        for m in report.damaged_manifests:
            out.print(Text.assemble("  ", ("damaged manifest", "red"), f" {m}"))
    intact = {r.id for r in report.points if r.state == "verified"}
    _prune_after_verify(
        c,
        repo,
        [p for p in points if p.id in intact],
        say=(lambda _m: None) if as_json else out.print,
        inventory=os.environ.get("SUREPOINT_VM_INVENTORY"),
    )
    if report.damaged:
        raise typer.Exit(EXIT_DAMAGE)


def _prune_after_verify(
    c: Context,
    repo: Repository,
    points: list[RestorePoint],
    *,
    say: Callable[[str], object],
    inventory: str | None,
) -> None:
    """Log mode after-verify: prune the logs of those `points` now verified in full (a VM that a
    lab can boot also needs a passed `surepoint lab verify`). Used by verify and lab verify."""
    from surepoint.consistency.logs import prune_if_verified

    catalog = c.catalog()
    for point in points:

        def event(component: str, phase: str, outcome: str, message: str = "", point_id: str = point.id) -> None:
            catalog.add_event(repo.id, component, phase, outcome, message, restore_point=point_id)
            say(f"  {point_id} {component} {phase}: {outcome} {message}")

        prune_if_verified(catalog, repo.id, point, event, inventory=inventory)


def _parse_since(text: str) -> str:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r} is not a date like 2026-01-31 or 2026-01-31T12:00") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@app.command()
def forget(
    ctx: typer.Context,
    keep_last: Annotated[int, typer.Option(min=0)] = 0,
    keep_hourly: Annotated[int, typer.Option(min=0)] = 0,
    keep_daily: Annotated[int, typer.Option(min=0)] = 0,
    keep_weekly: Annotated[int, typer.Option(min=0)] = 0,
    keep_monthly: Annotated[int, typer.Option(min=0)] = 0,
    keep_yearly: Annotated[int, typer.Option(min=0)] = 0,
    name: Annotated[str | None, typer.Option(help="Only restore points of this name.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be forgotten.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Run garbage collection afterwards.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Forget restore points by a retention policy (per name); data goes at the next `gc`."""
    from surepoint.repo.locks import repository_lock

    c: Context = ctx.obj
    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if policy.is_empty():
        raise UsageError("give at least one --keep-* rule (forgetting everything is not an option)")
    repo = c.open_repository()
    points = [p for p in repo.list_restore_points() if name is None or p.name == name]
    decisions = []
    for group in sorted({p.name for p in points}):
        members = [p for p in points if p.name == group]
        kept = apply_policy(
            [Candidate(p.id, datetime.fromisoformat(p.created.replace("Z", "+00:00"))) for p in members],
            policy,
        )
        for p in members:
            decisions.append(
                {
                    "id": p.id,
                    "name": p.name,
                    "created": p.created,
                    "keep": p.id in kept,
                    "reasons": kept.get(p.id, []),
                }
            )
    to_forget = [p for p in points if any(d["id"] == p.id and not d["keep"] for d in decisions)]
    if not dry_run and to_forget:
        with repository_lock(repo.backend, "forget"):
            for p in to_forget:
                repo.delete_restore_point(p)
                c.catalog().add_event(repo.id, "retention", "forget", "ok", "forgotten by policy", restore_point=p.id)
    if as_json:
        _print_json({"dry_run": dry_run, "decisions": decisions})
    else:
        table = Table(title="retention" + (" (dry run: nothing forgotten)" if dry_run else ""))
        for col in ("id", "name", "created (UTC)", "action", "reasons"):
            table.add_column(col)
        for d in decisions:
            action = "keep" if d["keep"] else ("would forget" if dry_run else "forgotten")
            table.add_row(d["id"], d["name"], d["created"][:19].replace("T", " "), action, ", ".join(d["reasons"]))
        out.print(table)
    if prune and not dry_run:
        _gc(c, repo, dry_run=False, as_json=False)


@app.command()
def gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    grace: Annotated[
        float, typer.Option(help="Keep unreferenced data younger than this many seconds (clock-skew margin).", min=0)
    ] = MARGIN_SECONDS,
    as_json: JsonOption = False,
) -> None:
    """Remove chunks and indexes that no restore point refers to (safe while backups run)."""
    c: Context = ctx.obj
    _gc(c, c.open_repository(), dry_run=dry_run, as_json=as_json, grace=grace)


def _gc(c: Context, repo: Repository, *, dry_run: bool, as_json: bool, grace: float = MARGIN_SECONDS) -> None:
    result = collect_garbage(repo, dry_run=dry_run, margin=grace, log=lambda m: err.print(m))
    if not dry_run:
        c.catalog().add_event(repo.id, "gc", "sweep", "ok", f"removed {result.removed_chunks} chunks")
    if as_json:
        _print_json(asdict(result))
        return
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {result.removed_chunks} chunks ({_human(result.removed_bytes)}), {result.removed_indexes} "
        f"orphaned indexes, {result.removed_temporary} temporary files; {result.referenced_chunks} chunks in use, "
        f"{result.kept_recent_chunks} recent unreferenced chunks kept for running or recent backups"
    )


vm_app = typer.Typer(help="Virtual machines: find them, restore them.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")


@vm_app.command("list")
def vm_list(
    inventory: Annotated[
        str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory file (TOML).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """VMs that can be backed up: running QEMU processes with a QMP socket, and the inventory file."""
    from surepoint.vm.inventory import load_inventory, running_vms

    vms = (load_inventory(inventory) if inventory else []) + running_vms()
    if as_json:
        _print_json([{"name": v.name, "qmp": v.qmp, "guest_agent": v.guest_agent, "pid": v.pid} for v in vms])
        return
    table = Table(title="virtual machines")
    for col in ("name", "pid", "QMP socket", "guest agent socket"):
        table.add_column(col)
    for v in vms:
        table.add_row(v.name, str(v.pid or ""), v.qmp, v.guest_agent or "(none)")
    out.print(table)


@vm_app.command("restore")
def vm_restore(
    ctx: typer.Context,
    restore_point: Annotated[str, typer.Argument(help="Id, id prefix, or NAME:latest of a VM restore point.")],
    to: Annotated[str, typer.Option("--to", help="Directory for the VM's disks and its start script.")],
    disk_format: Annotated[str, typer.Option("--format", help="qcow2 or raw.")] = "qcow2",
    start: Annotated[bool, typer.Option("--start", help="Boot it and wait for the guest agent.")] = False,
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")] = 300,
    as_json: JsonOption = False,
) -> None:
    """Recreate a VM from a restore point: its disks and its QEMU command line; optionally boot it."""
    from surepoint.jobs.vm_restore import restore_vm

    c: Context = ctx.obj
    repo = c.open_repository()
    point = repo.resolve(restore_point)
    result = restore_vm(
        repo,
        point,
        to,
        disk_format=disk_format,
        start=start,
        boot_timeout=boot_timeout,
        log=lambda m: err.print(f"  {m}"),
    )
    c.catalog().add_event(repo.id, "restore", "vm", "ok", f"VM restored to {to}", restore_point=point.id)
    if as_json:
        _print_json(result)
        return
    out.print(f"restored VM {point.name} from {point.id} into {to}: {', '.join(result['disks'])}")
    out.print(f"start it with: {result['start_script']}")
    if start:
        out.print(f"booted (pid {result['pid']}); guest agent answered after {result['boot_seconds']:.1f} s")


writers_app = typer.Typer(help="Application-aware processing: what writers find.", no_args_is_help=True)
app.add_typer(writers_app, name="writers")


@writers_app.command("detect")
def writers_detect(
    job: Annotated[str | None, typer.Option("--job", help="Check the writers of this job file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show the applications found on this host (or those a job file configures) and what they store where."""
    from surepoint.consistency.detect import detect_host_applications, identify_configured
    from surepoint.consistency.runner import HostRunner
    from surepoint.jobs.config import load_job

    runner = HostRunner()
    found = identify_configured(load_job(job).writers, runner) if job else detect_host_applications(runner)
    if as_json:
        _print_json(found)
        return
    table = Table(title="writers" + (f" of {job}" if job else " found on this host"))
    for col in ("writer", "status", "components"):
        table.add_column(col)
    for item in found:
        comps = "\n".join(f"{c['kind']} {c['name']}: {', '.join(c['paths'])}" for c in item["components"])
        table.add_row(item["writer"], item["status"], comps or item.get("message", ""))
    out.print(table)


@app.command()
def passwd(
    ctx: typer.Context,
    new_passphrase_file: Annotated[
        str | None,
        typer.Option(envvar="SUREPOINT_NEW_PASSPHRASE_FILE", help="Read the new passphrase from a file."),
    ] = None,
) -> None:
    """Change the repository passphrase (the data keys stay; only their wrapping changes)."""
    c: Context = ctx.obj
    repo = c.open_repository()
    new = os.environ.get("SUREPOINT_NEW_PASSPHRASE")
    if new is None and new_passphrase_file:
        try:
            with open(new_passphrase_file) as f:
                new = f.read().rstrip("\n")
        except OSError as exc:
            raise UsageError(f"cannot read {new_passphrase_file}: {exc.strerror}") from None
    if new is None:
        if not sys.stdin.isatty():
            raise UsageError("give the new passphrase in SUREPOINT_NEW_PASSPHRASE or --new-passphrase-file")
        new = getpass.getpass("new passphrase: ")
        if getpass.getpass("repeat new passphrase: ") != new:
            raise UsageError("the passphrases do not match")
    repo.change_passphrase(c.passphrase(), new)
    c.catalog().add_event(repo.id, "repository", "passwd", "ok", "passphrase changed")
    out.print(f"passphrase of repository {repo.id} changed")


@app.command()
def unlock(ctx: typer.Context) -> None:
    """Remove locks left by processes that are gone (this host) or abandoned (other hosts)."""
    c: Context = ctx.obj
    backend = open_backend(c.location())
    removed = remove_stale_locks(backend)
    remaining = read_locks(backend)
    out.print(f"removed {len(removed)} stale lock(s); {len(remaining)} lock(s) still held")
    for lock in remaining:
        out.print(f"  {lock.describe()}")


@app.command()
def events(
    ctx: typer.Context,
    restore_point: Annotated[str | None, typer.Argument(help="Only events of this restore point.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    as_json: JsonOption = False,
) -> None:
    """Show recorded events (job phases, writer phases, pruning, verification)."""
    c: Context = ctx.obj
    repo = c.open_repository()
    point_id = repo.resolve(restore_point).id if restore_point else None
    rows = c.catalog().events(repo.id, point_id, limit)
    if as_json:
        _print_json([asdict(e) for e in rows])
        return
    table = Table()
    for col in ("time (UTC)", "restore point", "source", "component", "phase", "outcome", "message"):
        table.add_column(col)
    for e in rows:
        table.add_row(
            e.time[:19].replace("T", " "),
            e.restore_point or "",
            e.source or "",
            e.component,
            e.phase,
            e.outcome,
            e.message,
        )
    out.print(table)


def _register_command_modules() -> None:
    from surepoint.cli import app_restore, copy, instant, lab, mount, serve, server

    mount.register(app)
    copy.register(app)
    serve.register(app)
    app_restore.register(app)
    instant.register(app)
    lab.register(app)
    server.register(app)


_register_command_modules()


def main() -> None:
    """Entry point: run the app and turn errors a user can cause into one line and an exit code."""
    try:
        app()
    except DamagedData as exc:
        # escape: messages hold paths, which may contain [brackets]; soft_wrap: one line, never wrapped
        _say_error(_error_with_hint(exc))
        sys.exit(EXIT_DAMAGE)
    except SurepointError as exc:
        _say_error(_error_with_hint(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(0)
