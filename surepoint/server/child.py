"""How the server starts a session's `surepoint` process: it dies with the server.

`python -m surepoint.server.child ARGS...` asks the kernel to send it SIGTERM when the server's
thread that started it ends (PR_SET_PDEATHSIG), then runs `surepoint ARGS...` in-process. So a
server killed hard (SIGKILL, OOM) takes its running sessions with it, and the repository is
left as after any interrupted backup: consistent, the partial restore point never committed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent = int(os.environ.pop("SUREPOINT_SERVER_PID", "0") or 0)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent and os.getppid() != parent:
        sys.exit(143)  # the server died before prctl took effect
    # SIGTERM is how a session is cancelled: leave as after Ctrl-C (locks released, nothing committed).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from surepoint.cli import main as cli_main

    sys.argv = ["surepoint", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
