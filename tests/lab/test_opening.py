"""The pure parts of `lab open`: the exposed service, the bridge address the door needs, the door's port."""

from __future__ import annotations

import socket

import pytest

from surepoint.errors import InvalidArgument
from surepoint.lab.lab_file import parse_lab_config
from surepoint.lab.opening import bind_door, parse_expose, with_door_address


def test_parse_expose() -> None:
    assert parse_expose("10.0.2.15:5432") == ("10.0.2.15", 5432)
    assert parse_expose("[fd00::5]:389") == ("fd00::5", 389)
    for bad in ("db01:5432", "10.0.2.15", "10.0.2.15:0", "10.0.2.15:70000", "10.0.2.15:pg", ":5432"):
        with pytest.raises(InvalidArgument, match="GUEST_IP:PORT"):
            parse_expose(bad)


def test_door_address_added_only_when_the_lab_has_none_in_the_network() -> None:
    config = parse_lab_config({}, "<t>")
    assert with_door_address(config, "10.0.2.15").addresses == ["10.0.2.254/24"]
    config = parse_lab_config({}, "<t>")
    assert with_door_address(config, "192.168.7.254").addresses == ["192.168.7.253/24"]  # not the service's own
    config = parse_lab_config({"lab": {"addresses": ["10.0.2.2/24"]}}, "<t>")
    assert with_door_address(config, "10.0.2.15").addresses == ["10.0.2.2/24"]
    config = parse_lab_config({"lab": {"addresses": ["10.0.9.2/24"]}}, "<t>")
    assert with_door_address(config, "10.0.2.15").addresses == ["10.0.9.2/24", "10.0.2.254/24"]


def test_door_port_in_use_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(InvalidArgument, match=f"127.0.0.1:{port}"):
            bind_door(port)
    door = bind_door(0)
    try:
        assert door.getsockname()[0] == "127.0.0.1" and door.getsockname()[1] > 0
    finally:
        door.close()
