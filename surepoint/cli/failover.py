"""`surepoint failover`, `surepoint failback` and `surepoint failover plan`: run a VM from its replica.

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

import os
from typing import Annotated

import typer
from typer.core import TyperGroup

from surepoint.cli.common import JsonOption, err, out, print_json, with_hints
from surepoint.errors import InUse, UsageError
from surepoint.replica.errors import ReplicaNotFound, ReplicaPointNotFound, ReplicaStateError
from surepoint.text import printable

TARGET_ENV = "SUREPOINT_REPLICA_TARGET"
TargetOption = Annotated[
    str | None,
    typer.Option(
        "--target",
        envvar=TARGET_ENV,
        help="The replication target: the folder holding NAME-replica (as given to `replicate vm --to`).",
    ),
]
BootTimeout = Annotated[float, typer.Option(help="Seconds to wait for the guest agent.")]
HINTS = {
    ReplicaNotFound: "check --target (the folder given to `surepoint replicate vm --to`)",
    ReplicaPointNotFound: "see `surepoint replica list`",
    ReplicaStateError: "`surepoint failover NAME --undo` ends a failover; `surepoint failback NAME` returns to the "
    "original",
}


class _DefaultVm(TyperGroup):
    """`failover NAME ...` runs the `vm` command; `failover plan ...` the plan group."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["vm", *args]
        return super().parse_args(ctx, args)


def _target(target: str | None) -> str:
    if not target:
        raise UsageError(f"give --target DIR (the replication target) or set {TARGET_ENV}")
    return target


def _say(as_json: bool):
    return (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))


def _replicator(target: str, inventory: str | None, say):
    """One replication cycle of a VM into its replica under `target`, for a planned failover: the
    guest is shut down by then, so nothing is frozen (its disks are quiet and clean)."""
    try:
        from surepoint.jobs.replicate import ReplicateOptions, replicate_vm
        from surepoint.jobs.vm_capture import CaptureOptions
        from surepoint.replica.target import open_site
    except ImportError:
        return None
    from surepoint.vm.inventory import find_vm

    def cycle(vm: str):
        site = open_site(target)
        try:
            options = ReplicateOptions(capture=CaptureOptions(quiesce=False))
            return replicate_vm(find_vm(vm, inventory), site, options, log=say)
        finally:
            site.close()

    return cycle


def register(app: typer.Typer) -> None:
    """Add `failover` (with `failover plan`) and `failback` to the main app."""
    failover_app = typer.Typer(
        cls=_DefaultVm,
        help="Run a VM from its replica: failover NAME [--point P|--undo|--permanent|--planned] "
        "(all options: failover vm --help); failover plan run|check FILE.",
        no_args_is_help=True,
    )
    app.add_typer(failover_app, name="failover")
    plan_app = typer.Typer(help="Failover plans: several VMs in order, each checked up before the next.")
    failover_app.add_typer(plan_app, name="plan")

    @failover_app.command("vm", hidden=True)
    @with_hints(HINTS)
    def failover_vm(
        name: Annotated[str, typer.Argument(help="The replicated VM's name.")],
        target: TargetOption = None,
        point: Annotated[
            str, typer.Option("--point", help="Point id (or prefix), latest, or a time: the latest point at or before.")
        ] = "latest",
        undo: Annotated[
            bool, typer.Option("--undo", help="Stop the failover VM, drop what it wrote; replication goes on.")
        ] = False,
        permanent: Annotated[
            bool, typer.Option("--permanent", help="The running failover VM becomes the production VM.")
        ] = False,
        planned: Annotated[
            bool,
            typer.Option("--planned", help="Shut the source down cleanly, send its last changes, then fail over."),
        ] = False,
        network: Annotated[
            list[str] | None,
            typer.Option("--network", help="NETDEV=TO or TO (every NIC); TO: none, user, bridge:NAME, tap:NAME."),
        ] = None,
        reip: Annotated[
            list[str] | None,
            typer.Option("--reip", help="SOURCE_SUBNET=TARGET_SUBNET[,gateway=IP][,dns=IP+IP] (re-IP in the guest)."),
        ] = None,
        boot_timeout: BootTimeout = 300,
        inventory: Annotated[
            str | None, typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory (to find the source VM).")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Boot the replica of NAME at a point (its disks untouched: writes go to overlays)."""
        from surepoint.jobs import failover as jobs
        from surepoint.replica.netmap import NetworkRule

        where = _target(target)
        say = _say(as_json)
        chosen = [flag for flag, on in (("--undo", undo), ("--permanent", permanent), ("--planned", planned)) if on]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)} exclude each other")
        if (undo or permanent) and (point != "latest" or network or reip):
            raise UsageError(f"{chosen[0]} takes no --point, --network or --reip")
        if undo:
            entry = jobs.undo(where, name, log=say)
            if as_json:
                print_json({"vm": name, "undone": entry})
            else:
                out.print(f"{printable(name)}: failover at point {entry.get('point')} undone; the replica is ready")
            return
        if permanent:
            record = jobs.permanent(where, name, log=say)
            if as_json:
                print_json({"vm": name, "permanent": record})
            else:
                out.print(
                    f"{printable(name)}: the failover VM is the production VM now; disks "
                    + ", ".join(record["disks"].values())
                    + f"; next start: {record['start_script']}"
                )
            return
        replicate = _replicator(where, inventory, say) if planned else None
        if planned and replicate is None:
            raise UsageError("a planned failover needs `surepoint replicate`, which this installation lacks")
        entry = jobs.failover_vm(
            where,
            name,
            point,
            planned=planned,
            replicate=replicate,
            boot_timeout=boot_timeout,
            network=[NetworkRule.parse(n) for n in network or []],
            reip=[_reip_rule(r) for r in reip or []],
            inventory=inventory,
            log=say,
        )
        if as_json:
            print_json(entry)
            return
        out.print(
            f"{printable(name)} runs from its replica at point {entry['point']} ({entry['point_time']}, "
            f"{entry['consistency']}) as {entry['name']} (pid {entry['pid']}); guest agent answered after "
            f"{entry['boot_seconds']:.1f} s ({entry['seconds']:.1f} s in all)"
        )
        out.print(f"QMP {entry['qmp']}, guest agent {entry['guest_agent']}")
        out.print(f"then: surepoint failover {name} --undo | --permanent, or surepoint failback {name}")

    @failover_app.command("status", hidden=True)
    def failover_status(name: Annotated[str, typer.Argument()], target: TargetOption = None) -> None:
        """Where the replica of NAME stands (ready, failed-over, permanent)."""
        from surepoint.jobs.failover import open_replica
        from surepoint.replica.failover import describe

        view = describe(open_replica(_target(target), name))
        print_json(view.__dict__)

    @plan_app.command("run")
    @with_hints(HINTS)
    def plan_run(
        file: Annotated[str, typer.Argument(help="The failover plan (TOML).")],
        undo: Annotated[bool, typer.Option("--undo", help="Undo the plan's failovers, in reverse order.")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Fail the plan's VMs over in order, each up (its checks passed) before the next starts."""
        from surepoint.jobs.failover import run_plan
        from surepoint.replica.plan import load_plan

        plan = load_plan(file)
        steps = run_plan(plan, undo_plan=undo, log=_say(as_json))
        if as_json:
            print_json({"plan": plan.path, "undo": undo, "vms": [s.__dict__ for s in steps]})
        else:
            for s in steps:
                point = f" at point {s.point}" if s.point else ""
                detail = f": {printable(s.detail)}" if s.detail else ""
                out.print(f"{printable(s.vm)}: {s.outcome}{point}{detail} ({s.seconds:.1f} s)")
        if any(s.outcome in ("failed", "not run") for s in steps):
            raise typer.Exit(1)

    @plan_app.command("check")
    def plan_check(file: Annotated[str, typer.Argument(help="The failover plan (TOML).")]) -> None:
        """Read a plan and say what it would do (nothing is started)."""
        from surepoint.replica.plan import load_plan

        plan = load_plan(file)
        for n, vm in enumerate(plan.vms, start=1):
            extra = []
            if vm.network:
                extra.append("network " + ", ".join(f"{r.netdev}={r.to}" for r in vm.network))
            if vm.reip:
                extra.append("re-IP " + ", ".join(f"{r.source}->{r.target}" for r in vm.reip))
            out.print(
                f"{n}. {printable(vm.name)} at {vm.point} from {printable(vm.target)}"
                + (f", {'; '.join(extra)}" if extra else "")
                + (f", then wait {vm.delay:g} s" if vm.delay else "")
            )

    @app.command("failback")
    @with_hints({**HINTS, InUse: "shut the original VM down first (a failback writes into its disks)"})
    def failback_cmd(
        name: Annotated[str, typer.Argument(help="The replicated VM's name.")],
        target: TargetOption = None,
        to: Annotated[
            str, typer.Option("--to", help="original (write into the original VM's disks) or a new folder.")
        ] = "original",
        start: Annotated[
            bool, typer.Option("--start/--no-start", help="Start the VM when its disks are ready.")
        ] = True,
        boot_timeout: BootTimeout = 300,
        as_json: JsonOption = False,
    ) -> None:
        """Send back only what the replica changed since failover (and where the original diverged), then switch."""
        from surepoint.jobs.failback import failback_vm

        if to != "original" and os.path.exists(to) and not os.path.isdir(to):
            raise UsageError(f"--to {to}: not a folder")
        report = failback_vm(_target(target), name, to=to, start=start, boot_timeout=boot_timeout, log=_say(as_json))
        if as_json:
            print_json(report)
            return
        mib = 2**20
        out.print(
            f"{printable(name)}: sent {report['sent_bytes'] / mib:.1f} MiB of {report['disk_bytes'] / mib:.0f} MiB "
            f"of disk back to {printable(report['to'])} in {report['write_seconds']:.1f} s"
        )
        if report.get("started"):
            out.print(f"{printable(name)} runs again (pid {report['pid']}); the replica is ready to replicate")


def _reip_rule(text: str):
    """SOURCE=TARGET[,gateway=IP][,dns=IP+IP] from the command line."""
    from surepoint.replica.reip import ReipRule

    subnets, *options = text.split(",")
    source, sep, dest = subnets.partition("=")
    if not sep:
        raise UsageError(f"--reip {text!r}: give SOURCE_SUBNET=TARGET_SUBNET")
    gateway, dns = None, []
    for option in options:
        key, _, value = option.partition("=")
        if key == "gateway":
            gateway = value
        elif key == "dns":
            dns = [d for d in value.split("+") if d]
        else:
            raise UsageError(f"--reip {text!r}: unknown option {key!r} (gateway=, dns=)")
    return ReipRule.make(source, dest, gateway, dns)
