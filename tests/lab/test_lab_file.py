"""Lab files: what a user writes is validated with errors that say where and what, and defaults hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from surepoint.errors import ConfigError
from surepoint.lab.lab_file import load_lab_config, parse_lab_config

GOOD = """
[lab]
timeout = 900
addresses = ["10.0.2.2/24"]

[[group]]
name = "db"
restore_point = "db01:latest"
boot_timeout = 200
[[group.test]]
type = "port"
port = 5432
[[group.test]]
type = "postgresql"
database = "shop"

[[group]]
name = "cache"
restore_point = "abc123"

[[verify]]
vm = "web01"
[[verify.test]]
type = "port"
port = 443

[[verify]]
vm = "*"
"""


def test_a_good_file_keeps_order_and_adds_the_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(GOOD)
    config = load_lab_config(str(path))
    assert (config.timeout, config.network, config.addresses) == (900.0, "isolated", ["10.0.2.2/24"])
    assert [g.name for g in config.group] == ["db", "cache"]
    assert [t.type for t in config.group[0].tests] == ["heartbeat", "port", "postgresql"]
    assert config.group[0].boot_timeout == 200
    assert [t.type for t in config.group[1].tests] == ["heartbeat"]  # no tests: the agent must answer
    assert [t.type for t in config.spec_for("web01").tests] == ["heartbeat", "port"]
    assert [t.type for t in config.spec_for("other").tests] == ["heartbeat"]  # the "*" entry


def test_without_verify_entries_a_vm_gets_the_heartbeat() -> None:
    config = parse_lab_config({})
    assert [t.type for t in config.spec_for("any").tests] == ["heartbeat"]
    assert config.network == "isolated" and config.group == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lab": {"timeot": 5}}, "unknown setting(s) timeot"),
        ({"lab": {"timeout": -1}}, "timeout must be a positive number"),
        ({"lab": {"network": "bridged"}}, "network must be one of isolated, none"),
        ({"lab": {"addresses": ["10.0.2.300/24"]}}, "'10.0.2.300/24' is not an address"),
        ({"lab": {"addresses": ["10.0.2.2"]}}, "needs a prefix length"),
        ({"lab": {"network": "none", "addresses": ["10.0.2.2/24"]}}, 'addresses make no sense with network = "none"'),
        ({"group": [{"name": "db"}]}, "group 'db': `restore_point` is required"),
        ({"group": [{"restore_point": "x"}]}, "group 1: `name` must be"),
        ({"group": [{"name": "a b", "restore_point": "x"}]}, "`name` must be"),
        ({"group": [{"name": "db", "restore_point": "x"}] * 2}, "the name 'db' is used twice"),
        ({"group": [{"name": "db", "restore_point": "x", "test": [{"type": "pong"}]}]}, "group 'db' test 1"),
        ({"group": {"name": "db"}}, "`group` must be an array of tables"),
        ({"verify": [{"vm": "a"}, {"vm": "a"}]}, "already a [[verify]] entry for vm 'a'"),
        ({"verify": [{"vm": "a", "boot_timeout": "long"}]}, "boot_timeout must be a positive number"),
        (
            {"lab": {"network": "none"}, "verify": [{"test": [{"type": "port", "port": 22}]}]},
            "needs the lab network",
        ),
    ],
)
def test_mistakes_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_lab_config(raw, "lab.toml")
    assert message in str(caught.value)
    assert "lab.toml" in str(caught.value)


def test_unreadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_lab_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[lab\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_lab_config(str(bad))
