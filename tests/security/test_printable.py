"""surepoint.text.printable: what a guest or a user names never reaches a terminal raw."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from surepoint.text import printable

HOSTILE = [
    "\x1b[2J\x1b[H",  # clear the screen
    "\x1b]0;owned\x07",  # set the window title
    "\x9b31m",  # C1 CSI
    "line\nerror: forged",
    "car\rriage",
    "bidi\u202etxt.exe",
    "zero\u200bwidth",
    "sep\u2028arator",
    "nul\0byte",
    "del\x7f",
]


def _unsafe(text: str, keep: str = "") -> list[str]:
    return [c for c in text if c not in keep and unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs"}]


def test_hostile_names_print_without_a_control_character():
    for name in HOSTILE:
        shown = printable(name)
        assert not _unsafe(shown), (name, shown)
        assert "\n" not in shown and "\x1b" not in shown


def test_plain_names_print_unchanged():
    for name in ["web01", "disk 1.img", "ünïcödé", "[brackets]", "a'quote\"", "日本語"]:
        assert printable(name) == name


def test_escapes_are_readable_and_distinct():
    assert printable("\x1b[31m") == "\\e[31m"
    assert printable("a\nb\tc") == "a\\nb\\tc"
    assert printable("\u202e") == "\\u202e"
    assert printable(b"caf\xe9") == "caf\\xe9"  # not UTF-8: the byte as it is
    assert printable("caf\udce9") == "caf\\xe9"  # the same name decoded with surrogateescape
    assert printable("a\\e") == "a\\\\e" != printable("a\x1b")  # a backslash cannot fake an escape


def test_whole_messages_keep_their_lines():
    assert printable("one\n\ttwo \x1b[2J", lines=True) == "one\n\ttwo \\e[2J"
    assert printable("C:\\dir", lines=True) == "C:\\dir"


def _unescape(shown: str) -> str:
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "e": "\x1b", "\\": "\\"}
    while i < len(shown):
        if shown[i] != "\\":
            out.append(shown[i])
            i += 1
            continue
        kind = shown[i + 1]
        if kind in simple:
            out.append(simple[kind])
            i += 2
        elif kind == "x":
            value = int(shown[i + 2 : i + 4], 16)
            out.append(chr(value) if value < 0x80 else chr(0xDC00 + value))
            i += 4
        else:
            width = 4 if kind == "u" else 8
            out.append(chr(int(shown[i + 2 : i + 2 + width], 16)))
            i += 2 + width
    return "".join(out)


@given(st.text(alphabet=st.characters(codec=None, exclude_categories=[])))
def test_any_name_prints_safely_and_can_be_told_apart(name):
    shown = printable(name)
    assert not _unsafe(shown)
    assert _unescape(shown) == name  # one printed form per name: nothing is hidden or merged


@given(st.binary())
def test_any_bytes_print_safely(raw):
    shown = printable(raw)
    assert not _unsafe(shown)
    assert _unescape(shown).encode("utf-8", "surrogateescape") == raw
