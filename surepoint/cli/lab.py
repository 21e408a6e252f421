"""`surepoint lab`: recovery verification of VM restore points in an isolated lab.

No `from __future__ import annotations` here: typer evaluates the annotations of the commands.
"""

import os
from typing import Annotated

import typer

from surepoint.cli.common import EXIT_DAMAGE, Context, JsonOption, err, out, parse_size, print_json, with_hints
from surepoint.errors import NeedsRoot, UsageError
from surepoint.interrupt import at_stake

EXIT_RECOVERY_FAILED = 4
DEFAULT_REPORT_DIR = "/var/lib/surepoint/lab-reports"


def _targets(repo, refs: list[str]) -> list:
    """Restore points from ids / NAME:latest, or the latest restore point of each VM job file given."""
    from surepoint.jobs.job_file import load_job

    points = []
    for ref in refs:
        if ref.startswith("replica:"):  # replica:DIR[@POINT], booted from the replica's files
            from surepoint.jobs.failover import replica_lab_target

            points.append(replica_lab_target(ref))
        elif ref.endswith(".toml") or os.path.isfile(ref):
            job = load_job(ref)
            if job.vm is None:
                raise UsageError(f"job {ref} backs up image files, not a VM: a lab can only boot VM restore points")
            point = repo.latest_named(job.vm)
            if point is None:
                raise UsageError(f"job {ref} has no restore point yet (nothing named {job.vm!r}): run the backup first")
            points.append(point)
        else:
            points.append(repo.resolve(ref))
    unique = {p.id: p for p in points}
    return list(unique.values())


def register(app: typer.Typer) -> None:
    """Add the `lab` command group to the main app."""
    lab_app = typer.Typer(help="Recovery verification: boot restore points in an isolated lab and test them.")
    app.add_typer(lab_app, name="lab")

    @lab_app.command("verify")
    @with_hints({NeedsRoot: "run `surepoint lab verify` as root"})
    def lab_verify(
        ctx: typer.Context,
        targets: Annotated[
            list[str],
            typer.Argument(
                help="Restore points (id, id prefix, NAME:latest), VM job files (their latest point), "
                "or replica states (replica:DIR[@POINT])."
            ),
        ],
        group: Annotated[
            str | None,
            typer.Option(
                "--group",
                help="Lab file (TOML): network, application group, tests of verified VMs "
                "(default: an isolated lab, no group, the heartbeat test).",
            ),
        ] = None,
        report_dir: Annotated[
            str, typer.Option("--report-dir", help="Where the JSON and text reports are written.")
        ] = DEFAULT_REPORT_DIR,
        integrity: Annotated[
            bool, typer.Option("--integrity/--no-integrity", help="Also check every chunk of the verified points.")
        ] = True,
        cache_size: Annotated[str, typer.Option(help="Chunk cache of each repository mount, e.g. 256M.")] = "256M",
        inventory: Annotated[
            str | None,
            typer.Option(envvar="SUREPOINT_VM_INVENTORY", help="VM inventory (to prune logs in production VMs)."),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Boot restore points from the repository in an isolated lab, run their tests, record the outcome.

        The application group's VMs start first, in order, each passing its tests before the next;
        then the restore points given. Nothing is written to the repository and nothing in the lab
        can reach production. Exit 0 when every VM passed, 4 when a test failed, 3 on damaged chunks.
        """
        from surepoint.jobs.after_verify import prune_after_verify
        from surepoint.jobs.verify import verify_and_record
        from surepoint.lab.lab_file import load_lab_config, parse_lab_config
        from surepoint.lab.verification import Lab
        from surepoint.mount.manager import MountOptions

        c: Context = ctx.obj
        config = load_lab_config(group) if group else parse_lab_config({}, "<defaults>")
        repo = c.open_repository()
        catalog = c.catalog()
        points = _targets(repo, targets)
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))

        # SIGINT and SIGTERM (surepoint.interrupt) tear the lab down on the way out, and say so.
        stake = "the lab is torn down (its VMs stopped, overlays, mounts and network removed); no report was written"
        with at_stake(stake):
            lab = Lab(
                repo,
                catalog,
                config,
                points,
                integrity=integrity,
                check_integrity=lambda booted: verify_and_record(repo, booted, catalog),
                mount_options=MountOptions(cache_bytes=parse_size(cache_size)),
                log=say,
            )
            report = lab.run()
        json_path, text_path = report.write(report_dir)
        prune_after_verify(repo, catalog, lab.booted, inventory=inventory, log=say)
        if as_json:
            print_json(dict(report.to_dict(), report_files=[json_path, text_path]))
        else:
            out.print(report.summary(), end="")
            out.print(f"report: {text_path} and {json_path}")
        if any(state == "damaged" for state in report.integrity.values()):
            raise typer.Exit(EXIT_DAMAGE)
        if report.outcome != "passed":
            raise typer.Exit(EXIT_RECOVERY_FAILED)

    @lab_app.command("open")
    @with_hints({NeedsRoot: "run `surepoint lab open` as root"})
    def lab_open(
        ctx: typer.Context,
        targets: Annotated[
            list[str],
            typer.Argument(help="Restore points (id, id prefix, NAME:latest) or VM job files (their latest point)."),
        ],
        expose: Annotated[
            str, typer.Option("--expose", help="The one service reachable from this host: GUEST_IP:PORT in the lab.")
        ],
        port: Annotated[
            int, typer.Option("--port", help="Port of the door on this host's 127.0.0.1 (default: a free one).")
        ] = 0,
        protocol: Annotated[
            str,
            typer.Option(
                "--protocol",
                help="How to tell the service is ready before the door opens: tcp (a connect), postgresql or "
                "mysql (the server takes clients); auto: by the port (5432, 3306), else tcp.",
            ),
        ] = "auto",
        group: Annotated[
            str | None, typer.Option("--group", help="Lab file (TOML): network and application group to boot first.")
        ] = None,
        cache_size: Annotated[str, typer.Option(help="Chunk cache of each repository mount, e.g. 256M.")] = "256M",
        as_json: JsonOption = False,
    ) -> None:
        """Boot restore points in an isolated lab, keep them running, and open one door to one service.

        The application group's VMs boot first (each passing its tests), then the restore points
        given. A port on this host's 127.0.0.1 is forwarded to GUEST_IP:PORT inside the lab, and
        nothing else goes in or out: use any client (psql, an LDAP browser...) through it. The
        command returns once the door is open; `surepoint lab close ID` tears the lab down.
        """
        from surepoint.lab.lab_file import load_lab_config, parse_lab_config
        from surepoint.lab.opening import open_lab
        from surepoint.mount.manager import MountOptions

        if not 0 <= port < 65536:
            raise UsageError(f"--port {port}: give a port number (1-65535), or none for a free one")
        c: Context = ctx.obj
        config = load_lab_config(group) if group else parse_lab_config({}, "<defaults>")
        repo = c.open_repository()
        points = _targets(repo, targets)
        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        opened = open_lab(
            repo,
            c.catalog(),
            config,
            points,
            expose,
            port,
            protocol=protocol,
            mount_options=MountOptions(cache_bytes=parse_size(cache_size)),
            log=say,
        )
        if as_json:
            print_json(opened.to_json())
            return
        for vm in opened.vms:
            out.print(f"  {vm['name']} ({vm['restore_point']}): {', '.join(vm['addresses']) or 'no address seen'}")
        out.print(f"lab {opened.lab_id} open: {opened.door} -> {opened.target} (in the lab, {opened.seconds:.0f} s)")
        out.print(f"close it with: surepoint lab close {opened.lab_id}")

    @lab_app.command("close")
    def lab_close(
        lab_id: Annotated[str | None, typer.Argument(help="The open lab (default: the only one).")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Close an open lab: its door, its VMs, overlays, mounts and namespace go."""
        from surepoint.lab.opening import close_lab

        say = (lambda m: None) if as_json else (lambda m: err.print(f"  {m}"))
        state = close_lab(lab_id, say)
        if as_json:
            print_json({"closed": state.lab_id})
        else:
            out.print(f"lab {state.lab_id} closed")

    @lab_app.command("clean")
    def lab_clean(as_json: JsonOption = False) -> None:
        """Remove what crashed or killed labs left behind: VMs, overlays, mounts, namespaces."""
        from surepoint.lab.records import clean_leftovers

        if os.geteuid() != 0:
            raise UsageError("cleaning up labs needs root")
        said: list[str] = []
        cleaned = clean_leftovers(said.append if as_json else lambda m: (said.append(m), err.print(f"  {m}")))
        if as_json:
            print_json({"cleaned": cleaned, "log": said})
        else:
            out.print(f"cleaned {len(cleaned)} lab(s)" + (f": {', '.join(cleaned)}" if cleaned else ""))

    @lab_app.command("list")
    def lab_list(as_json: JsonOption = False) -> None:
        """Labs that are running now (and leftovers of labs that died)."""
        from surepoint.lab.records import load_labs

        labs = load_labs()
        rows = [
            {
                "lab_id": s.lab_id,
                "pid": s.pid,
                "alive": s.owner_alive(),
                "status": s.status if s.owner_alive() else "dead (run `surepoint lab clean`)",
                "namespace": s.namespace,
                "door": s.door or None,
                "restore_points": s.points,
                "vms": s.vm_workdirs,
            }
            for s in labs
        ]
        if as_json:
            print_json({"labs": rows})
            return
        if not rows:
            out.print("no lab running")
        for row in rows:
            door = f", door {row['door']}" if row["door"] else ""
            out.print(f"lab {row['lab_id']} (pid {row['pid']}): {row['status']}{door}, namespace {row['namespace']}")
            for vm in row["vms"]:
                out.print(f"  {vm}")
