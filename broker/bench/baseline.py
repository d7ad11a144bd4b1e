"""The broker of another commit, for side-by-side runs (`token-broker bench --baseline REF`).

`git archive REF` of this repository is unpacked into the bench's work dir and its broker is
started with this interpreter and its packages (brokerproc.start(source=...)): the same
machine, the same moment, the same dependencies — only the broker's code differs.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def export(ref: str, into: Path) -> Path:
    """The tree of commit `ref` unpacked at `into` (replaced if it exists)."""
    git = shutil.which("git")
    if git is None:
        raise SystemExit("token-broker bench --baseline needs git")
    try:
        archive = subprocess.run(  # noqa: S603 (fixed arguments; ref is checked by git)
            [git, "archive", "--format=tar", f"{ref}^{{commit}}"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(
            f"token-broker bench --baseline {ref}: {exc.stderr.decode(errors='replace').strip()}"
        ) from None
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into
