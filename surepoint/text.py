"""Text from guests and users made safe to print: no control character ever reaches a terminal raw.

A guest chooses its file names, labels and command output; a user chooses restore-point names
and paths. Printed raw, an escape sequence in one of them can rewrite the operator's screen, set
the window title, hide a line or forge one (a newline followed by "error: ..."). Every place that
prints such a name formats it with `printable()`; the command line's consoles pass every string
through `printable(..., lines=True)` as a last guard.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x1b": "\\e", "\\": "\\\\"}
# Control, format (bidi overrides, zero-width), line/paragraph separators, and lone surrogates
# (undecodable bytes of a name decoded with surrogateescape).
_UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def printable(text: str | bytes, *, lines: bool = False) -> str:
    """`text` with every control or format character written as an escape (`\\n`, `\\e`, `\\x07`, `\\u202e`).

    A name from a guest or a user (lines=False): everything is escaped, backslashes doubled, so the
    printed name is one line and tells apart a name holding a real escape from one holding the
    characters `\\e`. A whole message (lines=True): newlines and tabs stay, backslashes stay single.
    Bytes that are not valid UTF-8 (bytes input, or surrogate escapes from os.fsdecode) print as `\\xNN`.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isprintable() and (lines or "\\" not in text):
        return text
    out = []
    for char in text:
        if lines and char in "\n\t\\":
            out.append(char)
        elif char in _NAMED:
            out.append(_NAMED[char])
        elif char == " " or unicodedata.category(char) not in _UNSAFE:
            out.append(char)
        elif 0xDC80 <= ord(char) <= 0xDCFF:
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
    return "".join(out)
