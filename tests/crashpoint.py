"""Run the ``florist`` command with a crash point: the process SIGKILLs itself at a chosen file write.

    FLORIST_CRASH_AT="<name pattern>:<n>:<when>" python tests/crashpoint.py train PHOTOS --out RUN ...

On the ``n``-th (1-based) atomic rename onto a file whose name matches the
``fnmatch`` pattern, the process kills itself with SIGKILL, the way a crash or
the OOM killer ends a run (no ``finally``, no ``atexit``):

* ``torn``: its temporary file is first cut to half its size, as if the kill
  came in the middle of writing it;
* ``before``: the temporary file is complete but not yet renamed;
* ``after``: right after the rename, before the next step.

Every file florist writes goes through :func:`florist.files.atomic_open`, which
publishes it with ``os.replace``; hooking ``os.replace`` reaches every write
without a test hook in florist itself. Used by ``tests/test_crash.py``.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys

WHEN = ("torn", "before", "after")


def install(spec: str) -> None:
    """Make the ``n``-th rename onto a matching name kill this process (see the module docstring)."""
    pattern, n, when = spec.rsplit(":", 2)
    if when not in WHEN:
        raise SystemExit(f"FLORIST_CRASH_AT: <when> must be one of {WHEN}, got {when!r}")
    target, seen = int(n), 0
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        nonlocal seen
        if fnmatch.fnmatchcase(os.path.basename(os.fsdecode(dst)), pattern):
            seen += 1
            if seen == target:
                if when == "torn":
                    os.truncate(src, os.path.getsize(src) // 2)
                if when == "after":
                    real_replace(src, dst, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


if __name__ == "__main__":
    install(os.environ["FLORIST_CRASH_AT"])
    from florist.cli import main

    sys.argv = ["florist", *sys.argv[1:]]
    main()
