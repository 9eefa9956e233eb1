"""How a process of the command line is stopped before its own stop handling exists: while a long-running
command still loads (imports, settings), a SIGTERM or SIGINT ends it at once with status 0, since it holds
nothing yet that needs flushing; and a child of `up` follows `up`, so that nothing `up` started outlives it.
Standard library only: this runs before anything heavy is imported."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

__all__ = ["LONG_RUNNING", "STOP_SIGNALS", "SUPERVISOR_ENV", "follow_supervisor", "guard_loading"]

LONG_RUNNING = frozenset(
    {"up", "stream", "sink", "notify", "api", "collect", "webhook-receiver", "prometheus"}
)
"""The commands that run until stopped (``collect --once`` excepted)."""

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

SUPERVISOR_ENV = "AIMA_SUPERVISOR_PID"
"""Set by `up` in its children's environment: the pid whose death ends them."""

_PR_SET_PDEATHSIG = 1


def guard_loading(args: Sequence[str]) -> None:
    """For a long-running command: a stop before the command installs its own handling exits 0 at once.
    The command's :class:`bus.runtime.Service` (or `up`) replaces these handlers. Then the stop signals
    are unblocked: `up` starts its children with them blocked, so that one sent meanwhile waits for this."""
    if args and args[0] in LONG_RUNNING and "--once" not in args:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _stop_while_loading)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _stop_while_loading(signum: int, frame: FrameType | None) -> None:
    line = {
        "level": "info",
        "msg": "stop requested while loading: exiting",
        "signal": signal.Signals(signum).name,
    }
    with contextlib.suppress(OSError):
        os.write(2, (json.dumps(line) + "\n").encode())
    os._exit(0)


def follow_supervisor(supervisor: int | None) -> None:
    """In a child of `up` (``supervisor``: its pid, ``AIMA_SUPERVISOR_PID`` read by
    aima_metrics.settings.LifecycleSettings): the kernel sends it SIGTERM when `up` dies, however `up` dies
    (Linux's parent-death signal); if `up` is gone already, it exits at once. The variable is taken out
    of the environment, so that processes this one starts do not follow a pid not their parent."""
    os.environ.pop(SUPERVISOR_ENV, None)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != supervisor:
        os._exit(0)
