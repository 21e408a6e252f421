"""Re-IP rules on sample guest files: ifupdown, systemd-networkd, resolv.conf."""

from __future__ import annotations

import pytest

from surepoint.errors import InvalidArgument
from surepoint.replica.reip import ReipRule, map_address, rewrite_interfaces, rewrite_networkd, rewrite_resolv_conf

RULES = [ReipRule.make("192.168.1.0/24", "10.10.1.0/24", gateway="10.10.1.254", dns=["10.10.1.53"])]

INTERFACES = """\
# The loopback network interface
auto lo
iface lo inet loopback

auto ens3
iface ens3 inet static
    address 192.168.1.23/24
    gateway 192.168.1.1
    dns-nameservers 192.168.1.53 8.8.8.8

allow-hotplug ens4
iface ens4 inet static
\taddress 172.16.0.5
\tnetmask 255.255.0.0
"""

NETWORKD = """\
[Match]
Name=ens3

[Network]
Address=192.168.1.23/24
Gateway=192.168.1.1
DNS=192.168.1.53
DNS=8.8.8.8
"""


def test_addresses_keep_their_host_part():
    assert map_address("192.168.1.23/24", RULES)[0] == "10.10.1.23/24"
    assert map_address("192.168.1.200", RULES)[0] == "10.10.1.200"
    assert map_address("192.168.2.23/24", RULES) is None
    assert map_address("not an address", RULES) is None
    wide = [ReipRule.make("172.16.0.0/16", "172.20.0.0/16")]
    assert map_address("172.16.3.4/16", wide)[0] == "172.20.3.4/16"


def test_ifupdown_stanza_moves_and_others_stay():
    result = rewrite_interfaces(INTERFACES, RULES)
    assert "    address 10.10.1.23/24\n    gateway 10.10.1.254\n    dns-nameservers 10.10.1.53\n" in result.text
    assert "\taddress 172.16.0.5\n\tnetmask 255.255.0.0\n" in result.text  # no rule for it
    assert result.text.startswith("# The loopback network interface\nauto lo\niface lo inet loopback\n")
    assert result.interfaces == ["ens3"]
    assert len(result.changes) == 3
    untouched = rewrite_interfaces(INTERFACES, [ReipRule.make("10.0.0.0/8", "11.0.0.0/8")])
    assert untouched.text == INTERFACES and not untouched.changed


def test_ifupdown_without_gateway_rule_maps_the_gateway():
    rules = [ReipRule.make("192.168.1.0/24", "10.10.1.0/24")]
    text = rewrite_interfaces(INTERFACES, rules).text
    assert "gateway 10.10.1.1\n" in text and "dns-nameservers 10.10.1.53 8.8.8.8\n" in text


def test_networkd():
    result = rewrite_networkd(NETWORKD, RULES, "/etc/systemd/network/10-ens3.network")
    assert "Address=10.10.1.23/24\nGateway=10.10.1.254\nDNS=10.10.1.53\n" in result.text
    assert "8.8.8.8" not in result.text  # the rule's DNS servers replace the interface's
    assert result.interfaces == ["ens3"] and result.text.startswith("[Match]\nName=ens3\n")
    other = NETWORKD.replace("192.168.1.23", "192.168.9.23")
    assert rewrite_networkd(other, RULES).text == other


def test_resolv_conf():
    text = "search example.com\nnameserver 192.168.1.53\nnameserver 192.168.1.54\nnameserver 1.1.1.1\n"
    result = rewrite_resolv_conf(text, RULES)
    assert result.text == "search example.com\nnameserver 10.10.1.53\nnameserver 1.1.1.1\n"
    plain = rewrite_resolv_conf(text, [ReipRule.make("192.168.1.0/24", "10.10.1.0/24")])
    assert "nameserver 10.10.1.53\nnameserver 10.10.1.54\n" in plain.text


def test_guest_text_is_escaped_in_the_changes():
    hostile = INTERFACES.replace("iface ens3", "iface ens3\x1b[2J")
    result = rewrite_interfaces(hostile, RULES)
    assert all("\x1b" not in change for change in result.changes)
    assert any("\\e[2J" in change for change in result.changes)


def test_bad_rules():
    with pytest.raises(InvalidArgument, match="same IP version and prefix length"):
        ReipRule.make("192.168.1.0/24", "10.0.0.0/16")
    with pytest.raises(InvalidArgument, match="gateway"):
        ReipRule.make("192.168.1.0/24", "10.10.1.0/24", gateway="192.168.1.1")
    with pytest.raises(InvalidArgument):
        ReipRule.make("192.168.1.0/24", "nonsense")
