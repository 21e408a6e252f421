"""`surepoint replicate vm` and `surepoint replica list|forget|remove|receive`: VM replicas.

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

import os
import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from surepoint.cli.common import (
    Context,
    InventoryOption,
    JsonOption,
    human,
    log_line,
    out,
    print_json,
    say_error,
    short_time,
    with_hints,
)
from surepoint.errors import UsageError
from surepoint.jobs.replicate import ReplicateOptions, replicate_vms
from surepoint.jobs.vm_capture import CaptureOptions
from surepoint.replica.errors import ReplicaLocked, ReplicaNotFound, ReplicaOfAnotherVm, ReplicaStateError
from surepoint.replica.layout import DEFAULT_KEEP
from surepoint.replica.target import open_site

replicate_app = typer.Typer(help="Replicate running VMs to a ready-to-boot copy elsewhere.", no_args_is_help=True)
replica_app = typer.Typer(help="Replicas: list their restore points, forget points, remove them.", no_args_is_help=True)

TargetOption = Annotated[str, typer.Option("--to", help="A directory, or ssh://[user@]host[:port]/path.")]

HINTS = {
    ReplicaOfAnotherVm: "give this VM's replica another name with --replica-name, or another --to",
    ReplicaLocked: "another replication or a failover is running on it",
    ReplicaStateError: "see `surepoint failover --help` to end the failover first",
    ReplicaNotFound: "replicas are made by `surepoint replicate vm NAME --to TARGET`",
}


def _report(results: list, as_json: bool) -> bool:
    """Print one cycle's outcomes; True when one failed."""
    rows = []
    for name, result, error in results:
        if result is None:
            rows.append({"vm": name, "status": "failed", "error": error})
        else:
            rows.append({"status": "ok", **result.to_json()})
    if as_json:
        print_json({"vms": rows})
    else:
        table = Table(title="replication")
        for col in ("vm", "status", "point", "consistency", "changes found by", "sent", "zeroed", "time", "notes"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["vm"],
                r["status"],
                r.get("point", ""),
                r.get("consistency", ""),
                r.get("cbt", ""),
                human(r["sent_bytes"]) if "sent_bytes" in r else "",
                human(r["zeroed_bytes"]) if "zeroed_bytes" in r else "",
                f"{r['seconds']:.1f} s" if "seconds" in r else "",
                r.get("error") or "; ".join(r.get("notes", [])),
            )
        out.print(table)
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        say_error(f"replication of VM {r['vm']} failed: {r['error']}")
    return bool(failed)


@replicate_app.command("vm")
@with_hints(HINTS)
def replicate_vm_command(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Names of running VMs (QEMU -name, libvirt domain, inventory).")],
    to: TargetOption,
    keep: Annotated[int, typer.Option(help="Restore points kept in the replica.", min=1)] = DEFAULT_KEEP,
    interval: Annotated[
        float | None, typer.Option(help="Repeat every this many seconds until interrupted.", min=1)
    ] = None,
    replica_name: Annotated[
        str | None, typer.Option(help="Name of the replica directory (default NAME-replica; one VM only).")
    ] = None,
    seed_from: Annotated[
        str | None,
        typer.Option(help="First cycle: build the replica from REPOSITORY:POINT at the target's site."),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Compare every block by checksum.")] = False,
    inventory: InventoryOption = None,
    fallback: Annotated[str, typer.Option(help="try: fall back to crash consistency; require: fail.")] = "try",
    quiesce: Annotated[bool, typer.Option(help="Freeze guest filesystems through the guest agent.")] = True,
    freeze_timeout: Annotated[float, typer.Option(help="Seconds the guest may stay frozen.", min=1)] = 20.0,
    as_json: JsonOption = False,
) -> None:
    """Send each VM's changes since its replica's latest point to TARGET, as a new restore point.

    The replica (TARGET/NAME-replica) holds the VM's disks as qcow2 chains and its configuration,
    ready to boot. Exit 1 when any VM failed.
    """
    if replica_name and len(names) > 1:
        raise UsageError("--replica-name names one replica: give one VM")
    if fallback not in ("try", "require"):
        raise UsageError("--fallback must be try or require")
    c: Context = ctx.obj
    options = ReplicateOptions(
        keep=keep,
        replica_name=replica_name,
        capture=CaptureOptions(fallback=fallback, quiesce=quiesce, freeze_timeout=freeze_timeout),
        seed_from=seed_from,
        full=full,
    )
    site = open_site(to)
    try:
        while True:
            started = time.monotonic()
            results = replicate_vms(names, site, options, inventory=inventory, log=log_line, passphrase=c.passphrase)
            failed = _report(results, as_json)
            if interval is None:
                if failed:
                    raise typer.Exit(1)
                return
            options.seed_from = None  # a seed builds the first point only
            options.full = False
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        site.close()


@replica_app.command("list")
@with_hints(HINTS)
def replica_list(
    target: Annotated[str, typer.Argument(help="A directory of replicas (or one replica), or ssh://...")] = ".",
    as_json: JsonOption = False,
) -> None:
    """Replicas at TARGET and their restore points (time, consistency, bytes held)."""
    site = open_site(target)
    try:
        replicas = site.list()
    finally:
        site.close()
    if as_json:
        print_json({"replicas": replicas})
        return
    table = Table(title=f"replicas at {target}")
    for col in ("replica", "vm", "state", "point", "time", "consistency", "changes found by", "sent", "held"):
        table.add_column(col)
    for r in replicas:
        if not r["points"]:
            table.add_row(r["name"], r["vm"], r["state"], "(none)", "", "", "", "", "")
        for p in r["points"]:
            table.add_row(
                r["name"],
                r["vm"],
                r["state"],
                p["id"],
                short_time(p["time"]),
                p["consistency"],
                p.get("cbt", ""),
                human(p.get("sent_bytes", 0)),
                human(p.get("bytes", 0)),
            )
    out.print(table)


def _split(target: str, name: str | None) -> tuple[str, str]:
    """(site, replica name) from TARGET [NAME]: TARGET may be the replica directory itself."""
    if name:
        return target, name
    base = target.rstrip("/")
    parent, _, last = base.rpartition("/")
    if not last or not parent:
        raise UsageError("name the replica: surepoint replica forget TARGET NAME POINT... (or TARGET/NAME)")
    return parent if parent != "ssh:/" else base, last


@replica_app.command("forget")
@with_hints(HINTS)
def replica_forget(
    replica: Annotated[str, typer.Argument(help="The replica: TARGET/NAME (a directory or ssh://.../NAME).")],
    points: Annotated[list[str], typer.Argument(help="Point ids to drop.")],
    as_json: JsonOption = False,
) -> None:
    """Drop restore points of a replica (their changes fold into the next kept point)."""
    target, name = _split(replica, None)
    site = open_site(target)
    try:
        forgotten = site.forget(name, points)
    finally:
        site.close()
    if as_json:
        print_json({"forgotten": forgotten})
    else:
        out.print(f"forgot {len(forgotten)} point(s) of {name}: {' '.join(forgotten)}")


@replica_app.command("remove")
@with_hints(HINTS)
def replica_remove(
    replica: Annotated[str, typer.Argument(help="The replica: TARGET/NAME (a directory or ssh://.../NAME).")],
    yes: Annotated[bool, typer.Option("--yes", help="Really delete the replica and all its points.")] = False,
) -> None:
    """Delete a replica with every restore point it holds."""
    if not yes:
        raise UsageError("removing a replica deletes all its restore points: add --yes")
    target, name = _split(replica, None)
    site = open_site(target)
    try:
        site.remove(name)
    finally:
        site.close()
    out.print(f"removed replica {name}")


@replica_app.command("receive", hidden=True)
def replica_receive(path: Annotated[str, typer.Argument(help="Directory of replicas on this host.")]) -> None:
    """The far end of replication over ssh, on stdin/stdout (run through ssh; not for a terminal)."""
    from surepoint.replica.protocol import serve

    if sys.stdin.isatty():
        raise UsageError("surepoint replica receive speaks the replication protocol on stdin/stdout: ssh runs it")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but protocol messages may reach the client's stdout
    serve(os.path.abspath(path), stdin, stdout)


def register(app: typer.Typer) -> None:
    app.add_typer(replicate_app, name="replicate")
    app.add_typer(replica_app, name="replica")
