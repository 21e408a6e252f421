"""A VM's saved QEMU command line, rewritten to run elsewhere: restored disks, new sockets, a new name."""

from __future__ import annotations

import os


def _replace_option(arg: str, key: str, value: str) -> str:
    parts = arg.split(",")
    return ",".join(f"{key}={value}" if p.startswith(f"{key}=") else p for p in parts)


def rewrite_command_line(
    argv: list[str], disks: list[dict], new_paths: list[str], disk_format: str, workdir: str, name: str
) -> list[str]:
    """The saved QEMU command line with restored disks, new sockets and console, and a new name."""
    old_to_new = {d["filename"]: p for d, p in zip(disks, new_paths, strict=True) if d.get("filename")}
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if value is None or not flag.startswith("-") or value.startswith("-"):  # a value never starts with "-"
            out.append(flag)
            i += 1
            continue
        if flag == "-name":
            value = name
        elif flag == "-qmp" and value.startswith("unix:"):
            value = f"unix:{workdir}/qmp.sock,server=on,wait=off"
        elif flag == "-chardev" and "path=" in value:
            chardev_id = next((p[3:] for p in value.split(",") if p.startswith("id=")), "chardev")
            value = _replace_option(value, "path", os.path.join(workdir, f"{chardev_id}.sock"))
        elif flag == "-serial" and value.startswith("file:"):
            value = f"file:{workdir}/console.log"
        elif flag == "-pidfile":
            value = os.path.join(workdir, "qemu.pid")
        elif flag in ("-blockdev", "-drive"):
            for old, new in old_to_new.items():
                if old in value:
                    value = value.replace(old, new)
                    for key in ("driver", "format"):
                        if f"{key}=qcow2" in value or f"{key}=raw" in value:
                            # only the format layer's driver names a format; file.driver names the protocol
                            value = ",".join(
                                f"{key}={disk_format}" if p in (f"{key}=qcow2", f"{key}=raw") else p
                                for p in value.split(",")
                            )
        out += [flag, value]
        i += 2
    return out
