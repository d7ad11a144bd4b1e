"""Run by test_storage_faults inside its own mount namespace (`unshare -m`): a broker whose
data dir is a small tmpfs, filled until the file system itself says ENOSPC, then emptied.
Prints what it saw as one JSON object; the mount vanishes with the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc

from broker.api.server import create_server
from broker.cli import main as cli
from tests.audit_support import orchestrator
from tests.conftest import make_settings, standard_policy
from tests.support import details, start_run_request
from tokenbroker.v1 import broker_pb2

MARGIN = 48 * 1024


def fill(directory: Path) -> Path:
    """A file that takes all but MARGIN bytes of the file system's free space."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        while True:
            st = os.statvfs(directory)
            room = st.f_bavail * st.f_frsize - MARGIN
            if room <= 0:
                return filler
            out.write(b"\0" * min(room, 1 << 20))
            out.flush()


def main(root: Path) -> dict[str, object]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], check=True)
    server = create_server(make_settings(root / "data", policy=standard_policy(root)))
    server.start()
    seen: dict[str, object] = {}
    try:
        with orchestrator(server) as stub:
            acknowledged = [stub.StartRun(start_run_request(), timeout=5).run.run_id]
            filler = fill(root)
            for _ in range(2000):
                head = server.broker.store.head_sequence()
                try:
                    acknowledged.append(stub.StartRun(start_run_request(), timeout=5).run.run_id)
                except grpc.RpcError as error:
                    seen.update(code=error.code().name, details=details(error))
                    break
            seen["head_unchanged"] = server.broker.store.head_sequence() == head
            request = broker_pb2.ListRunsRequest(org="acme", page_size=500)
            listed = {r.run_id for r in stub.ListRuns(request, timeout=5).runs}
            seen["only_acknowledged"] = listed == set(acknowledged)
            filler.unlink()
            acknowledged.append(stub.StartRun(start_run_request(), timeout=5).run.run_id)
            listed = {r.run_id for r in stub.ListRuns(request, timeout=5).runs}
            seen["recovered"] = listed == set(acknowledged)
            seen["acknowledged"] = len(acknowledged)
    finally:
        server.stop(0.5)
    seen["verify"] = cli.main(["audit", "verify", "--data-dir", str(root / "data")])
    return seen


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
