"""Whether a store file can take writes now: free space and permission, for readiness.

A readiness signal, never a correctness check: a write that fails still fails closed on its
own (UNAVAILABLE, nothing changed). This lets the broker say "reads and verification only"
before callers find out write by write, and say when writing works again.
"""

from __future__ import annotations

import os
from pathlib import Path

# A group commit appends a few pages to the WAL; below this, writes are about to fail.
MIN_FREE_BYTES = 64 * 1024


def can_write(database: Path) -> bool:
    """True when `database` (and its directory, for the WAL) is writable and its file system
    has at least MIN_FREE_BYTES free for unprivileged use."""
    directory = database.parent
    # os.access also sees the immutable attribute, which stops even root.
    if not os.access(directory, os.W_OK) or not os.access(database, os.W_OK):
        return False
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= MIN_FREE_BYTES
