"""Failover plan files: parsing, defaults, and mistakes named with the file, the entry and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.errors import ConfigError
from surepoint.replica.plan import load_plan
from tests.conftest import Cli

PLAN = """\
[plan]
target = "/srv/site"
delay = 5

[[reip]]
source = "192.168.1.0/24"
target = "10.10.1.0/24"
gateway = "10.10.1.254"

[[vm]]
name = "db01"
point = "2026-11-30T10:00:00Z"
network = ["net0=bridge:br-dr"]
[vm.check]
port = 5432
command = ["systemctl", "is-active", "postgresql"]
timeout = 60

[[vm]]
name = "web01"
target = "/srv/other"
delay = 0
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return str(path)


def test_a_plan_in_order_with_defaults(tmp_path):
    plan = load_plan(write(tmp_path, PLAN))
    db, web = plan.vms
    assert [v.name for v in plan.vms] == ["db01", "web01"]
    assert (db.target, db.point, db.delay, db.boot_timeout) == ("/srv/site", "2026-11-30T10:00:00Z", 5.0, 300.0)
    assert db.network[0].netdev == "net0" and db.network[0].to == "bridge:br-dr"
    assert db.check.port == 5432 and db.check.command == ["systemctl", "is-active", "postgresql"]
    assert str(db.reip[0].target) == "10.10.1.0/24" and web.reip == db.reip
    assert (web.target, web.point, web.delay, web.check.port) == ("/srv/other", "latest", 0.0, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[vm]]\nname = 'a'\n", "needs target"),
        ("[plan]\ntarget = '/x'\n", "at least one [[vm]]"),
        ("[plan]\ntarget = '/x'\n[[vm]]\nname = 'a'\nbogus = 1\n", "unknown setting(s) bogus"),
        ("[plan]\ntarget = '/x'\n[[vm]]\nname = 'a'\n[vm.check]\nport = 70000\n", "[[vm]] a check: port"),
        ("[plan]\ntarget = '/x'\n[[vm]]\nname = 'a'\n[vm.check]\ncommand = 'systemctl x'\n", "argument vector"),
        ("[plan]\ntarget = '/x'\n[[vm]]\nname = 'a'\nnetwork = ['net0=wifi']\n", "use none, user"),
        ("[plan]\ntarget = '/x'\ndelay = -1\n[[vm]]\nname = 'a'\n", "delay must be a positive number"),
        ("[plan]\ntarget = '/x'\n[[vm]]\nname = 'a'\n[[vm]]\nname = 'a'\n", "listed twice: a"),
        (
            "[plan]\ntarget = '/x'\n[[reip]]\nsource = '10.0.0.0/8'\ntarget = '11.0.0.0/16'\n[[vm]]\nname='a'\n",
            "prefix",
        ),
        ("[plan\n", "not valid TOML"),
    ],
)
def test_mistakes(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_plan(write(tmp_path, text))
    assert message in str(err.value) and "plan.toml" in str(err.value)


def test_plan_check_and_a_plan_whose_replicas_are_missing(tmp_path):
    path = write(tmp_path, PLAN.replace("/srv/site", str(tmp_path)).replace("/srv/other", str(tmp_path)))
    cli = Cli(tmp_path)
    r = cli.run("failover", "plan", "check", path, check=True)
    assert r.stdout.splitlines()[0].startswith("1. db01 at 2026-11-30T10:00:00Z from ")
    assert "network net0=bridge:br-dr; re-IP 192.168.1.0/24->10.10.1.0/24, then wait 5 s" in " ".join(r.stdout.split())
    r = cli.run("failover", "plan", "run", path)
    assert r.returncode == 1
    flat = " ".join(r.stdout.split())
    assert "db01: failed: VM db01 has no replica in" in flat and "web01: not run: db01 failed" in flat
    r = cli.run("failover", "plan", "run", path, "--undo")
    assert r.returncode == 1 and "web01: failed" in r.stdout.splitlines()[0]
    r = cli.run("failover", "plan", "run", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
