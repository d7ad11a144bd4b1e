"""`/metrics` for every worker of `serve --workers N`, answered by worker 0's HTTP port.

Only worker 0 serves the HTTP port, so its own exposition would describe one worker of N. The
supervisor gives every other worker a private metrics endpoint — a loopback port it picks, on
which that worker serves nothing but its own `/metrics` (the same route, alone on a router) —
and tells worker 0 where they are. Worker 0's `/metrics` renders its own exposition while it
fetches the others' concurrently, each within `FETCH_TIMEOUT` and all within `TOTAL_TIMEOUT`,
at most `MAX_EXPOSITION_BYTES` each, then answers one exposition: every family's HELP and
TYPE once, its samples from every worker labelled `worker="i"`.

A worker that does not answer in time (restarting, hung, gone) or answers something that is
not an exposition is left out, never waited for beyond the bound and never a failed scrape;
`tokenbroker_workers_scraped` against `tokenbroker_workers_expected`, and
`tokenbroker_worker_scraped{worker="i"}`, tell the operator the scrape is partial.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

# The host of every private endpoint: never an address another machine can reach.
PRIVATE_HOST = "127.0.0.1"
FETCH_TIMEOUT = 1.0  # one worker's answer; a scrape interval is 15 s or more
TOTAL_TIMEOUT = 2.0  # every worker's: a hung one costs the scrape this much at most
# A worker's exposition is a few tens of KiB (no label carries a run id); far beyond that is
# not one of ours.
MAX_EXPOSITION_BYTES = 4 * 1024 * 1024
MAX_PEERS = 64  # settings.MAX_PROCESSES: never more fetches than workers there can be
WORKER_LABEL = "worker"
SCRAPED = "tokenbroker_workers_scraped"
EXPECTED = "tokenbroker_workers_expected"
WORKER_SCRAPED = "tokenbroker_worker_scraped"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Peer:
    """Worker `index` serves its own exposition at `PRIVATE_HOST:port/metrics`."""

    index: int
    port: int


class FetchFailed(Exception):
    """A worker's exposition could not be had: the reason, for the log."""


class WorkerScrape:
    """Worker 0's view of every worker's metrics: its own, plus the `peers`' fetched."""

    def __init__(
        self,
        peers: Sequence[Peer],
        *,
        fetch_timeout: float = FETCH_TIMEOUT,
        total_timeout: float = TOTAL_TIMEOUT,
        max_bytes: int = MAX_EXPOSITION_BYTES,
    ) -> None:
        if len(peers) > MAX_PEERS:
            raise ValueError(f"at most {MAX_PEERS} workers to scrape, not {len(peers)}")
        self.peers = tuple(peers)
        self.fetch_timeout = fetch_timeout
        self.total_timeout = total_timeout
        self.max_bytes = max_bytes
        self._missing: set[int] = set()  # said once in the log until the worker answers again
        self._lock = threading.Lock()

    def render(self, own: Callable[[], bytes], own_index: int = 0) -> bytes:
        """One exposition for every worker: this worker's (`own` renders it, while the peers
        are fetched) and whatever the peers answer within the bound."""
        deadline = time.monotonic() + self.total_timeout
        workers = [own_index, *(peer.index for peer in self.peers)]
        if not self.peers:
            return merge([(own_index, own())], workers)
        # Threads of this scrape alone, not waited for: a hung fetch ends by its own timeout
        # and must not hold up this or the next scrape.
        pool = futures.ThreadPoolExecutor(
            max_workers=len(self.peers), thread_name_prefix="metrics-fetch"
        )
        try:
            pending = {pool.submit(self._fetch, peer, deadline): peer.index for peer in self.peers}
        finally:
            pool.shutdown(wait=False)
        expositions: list[tuple[int, bytes]] = [(own_index, own())]
        done, _ = futures.wait(pending, timeout=max(deadline - time.monotonic(), 0.0))
        for future in pending:
            index = pending[future]
            error = future.exception() if future in done else FetchFailed("no answer in time")
            if error is None:
                expositions.append((index, future.result()))
                self._answered(index)
            else:
                self._missed(index, error)
        expositions.sort()
        return merge(expositions, workers)

    def _fetch(self, peer: Peer, deadline: float) -> bytes:
        timeout = max(min(self.fetch_timeout, deadline - time.monotonic()), 0.01)
        connection = http.client.HTTPConnection(PRIVATE_HOST, peer.port, timeout=timeout)
        try:
            connection.request("GET", "/metrics", headers={"Connection": "close"})
            response = connection.getresponse()
            if response.status != 200:
                raise FetchFailed(f"HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise FetchFailed(f"exposition of {declared} bytes")
            body = bytearray()
            while chunk := response.read1(_CHUNK):
                body += chunk
                if len(body) > self.max_bytes:
                    raise FetchFailed(f"exposition over {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchFailed("no answer in time")
            return bytes(body)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchFailed(str(exc) or type(exc).__name__) from None
        finally:
            connection.close()

    def _answered(self, index: int) -> None:
        with self._lock:
            if index in self._missing:
                self._missing.discard(index)
                log.info("worker metrics answer again", extra={"worker_scraped": index})

    def _missed(self, index: int, error: BaseException) -> None:
        with self._lock:
            if index in self._missing:
                return
            self._missing.add(index)
        log.warning(
            "worker metrics left out of the scrape",
            extra={"worker_scraped": index, "reason": str(error)},
        )


def merge(expositions: Sequence[tuple[int, bytes]], workers: Sequence[int]) -> bytes:
    """One exposition (text format 0.0.4) from each worker's: every family once, with the
    first worker's HELP and TYPE, its samples from every worker labelled `worker="i"`; then
    which of `workers` (every index a scrape should hold) are in it. An exposition that does
    not parse is left out."""
    families: dict[str, Metric] = {}
    scraped: list[int] = []
    for index, text in expositions:
        try:
            parsed = list(text_string_to_metric_families(text.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning(
                "worker metrics do not parse; left out",
                extra={"worker_scraped": index, "reason": str(exc)},
            )
            continue
        scraped.append(index)
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            elif merged.type != family.type:
                continue  # workers of one build agree; a family can have one TYPE only
            worker = str(index)
            merged.samples.extend(
                sample._replace(labels={**sample.labels, WORKER_LABEL: worker})
                for sample in family.samples
            )
    return generate_latest(_Families([*families.values(), *_coverage(scraped, workers)]))


def _coverage(scraped: list[int], workers: Sequence[int]) -> list[Metric]:
    total = Metric(EXPECTED, "Workers of this broker whose metrics a scrape should hold.", "gauge")
    total.add_sample(EXPECTED, {}, float(len(workers)))
    answered = Metric(SCRAPED, "Workers whose metrics this scrape holds.", "gauge")
    answered.add_sample(SCRAPED, {}, float(len(scraped)))
    each = Metric(WORKER_SCRAPED, "1 if this worker's metrics are in this scrape, else 0.", "gauge")
    for index in workers:
        each.add_sample(WORKER_SCRAPED, {WORKER_LABEL: str(index)}, float(index in scraped))
    return [total, answered, each]


class _Families:
    """A collector of already collected families, for `generate_latest`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families
