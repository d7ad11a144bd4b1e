"""A real full disk for tests: a size-limited tmpfs, filled and freed on demand.

Needs root (or CAP_SYS_ADMIN) to mount; tests using it skip where the machine does not
allow it. Each mount is private to one test and unmounted after it.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FILLER = "filler"


class SmallDisk:
    """A mounted file system of a few MiB at `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def fill(self) -> None:
        """Take every free byte (down to the last page), as a runaway log file would."""
        with (self.root / FILLER).open("ab", buffering=0) as filler:
            for chunk in (1 << 20, 4096, 512):
                try:
                    while True:
                        filler.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

    def free(self) -> None:
        (self.root / FILLER).unlink(missing_ok=True)


@contextmanager
def small_disk(mount_point: Path, size_mib: int = 32) -> Iterator[SmallDisk]:
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("mount is not installed; cannot make a size-limited file system")
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({result.stderr.strip()})")
    try:
        yield SmallDisk(mount_point)
    finally:
        # Lazy: a broker process killed by the test may still be closing its files.
        subprocess.run([umount, "-l", str(mount_point)], check=False)
