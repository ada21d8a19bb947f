"""A small pool of worker processes that survives its workers' deaths: start, send, time out,
replace, shut down. The math verifier and user reward functions are its two users
(:class:`nftune.verify.Verifier`, :class:`nftune.reward.FunctionPool`).

Each worker is ``python -m nftune._verify_worker MEMORY_MB JOB``: a fresh interpreter (not a
fork: it never imports the caller's ``__main__``, inherits no threads or locks, unpickles
nothing), in its own session so that a terminal's Ctrl-C does not reach it, told what to run by
``JOB``, a JSON object (data, never code). It answers JSON lines over pipes: ``{"ready": true}``
once warm, then one ``[index, result...]`` line per item.

A worker that overruns the time limit, dies or speaks nonsense is killed and replaced; the
item it was on is given up (after a second death for a death) and reported back to the caller
by :meth:`WorkerPool.run`'s return value.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_LIMIT_S = 120.0  # a worker's import and warm-up, on a loaded machine
STARTUP_FAILURES = 3  # workers in a row that die before they are ready: the pool gives up


class PoolError(RuntimeError):
    """The pool's workers cannot start (e.g. a broken install); the message says how to see
    why."""


def worker_count(workers: int | None) -> int:
    """``workers``, or the CPU count (at most 8) when None."""
    return min(os.cpu_count() or 1, 8) if workers is None else workers


def _readable(fds: list[int], timeout_s: float) -> list[int]:
    """The descriptors with data or end of file (poll: no FD_SETSIZE limit in big processes)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout_s * 1000)]


@dataclass(frozen=True)
class GivenUp:
    """An item no worker could finish: it overran the time limit, or killed two workers."""

    index: int
    timed_out: bool


class _Worker:
    """One worker process, spoken to in JSON lines over pipes."""

    def __init__(self, memory_mb: int, job: dict[str, Any]):
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                            if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nftune._verify_worker", str(memory_mb), json.dumps(job)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.pending: list[tuple] = []
        self.last_progress = time.monotonic()

    def send(self, chunk: list[tuple], timeout_s: float) -> None:
        self.pending = list(chunk)
        self.last_progress = time.monotonic()
        line = json.dumps({"timeout_s": timeout_s, "items": chunk}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def receive(self) -> list | None:
        """The messages that have arrived; None once the worker has died or written something
        that is not the protocol."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        try:
            return [json.loads(line) for line in lines]
        except ValueError:
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def stop(self) -> None:
        """End of input: the worker exits by itself; killed if it does not within a second."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class WorkerPool:
    """``size`` workers running ``job``, each under ``memory_mb`` of address space. Not
    thread-safe: its users serialise calls."""

    def __init__(self, size: int, memory_mb: int, job: dict[str, Any], chunk_size: int = 32):
        self.size, self.memory_mb, self.job, self.chunk_size = size, memory_mb, job, chunk_size
        self.restarts = 0
        self._workers: list[_Worker] = []
        self._failed_starts = 0

    @property
    def workers(self) -> list[_Worker]:
        """The worker processes now running (``.proc`` each)."""
        return list(self._workers)

    def start(self) -> None:
        """Replace workers that died between calls and start missing ones (their warm-up then
        overlaps whatever the caller does next)."""
        for i, worker in enumerate(self._workers):
            if not worker.alive():
                worker.kill()
                self._workers[i] = _Worker(self.memory_mb, self.job)
                self.restarts += 1
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self.memory_mb, self.job))

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def run(self, items: list[tuple], timeout_s: float,
            on_result: Callable[[int, list], None]) -> list[GivenUp]:
        """Every item (``(index, ...)``) through the workers, ``on_result(index, message)``
        for each answer; returns the items given up. An interrupted call kills the workers that
        were mid-chunk, so no stale answer reaches the next call."""
        self.start()
        size = max(1, min(self.chunk_size, -(-len(items) // (8 * len(self._workers)))))
        queue = deque(items[i: i + size] for i in range(0, len(items), size))
        run = _Run(self, queue, timeout_s)
        finished = False
        try:
            for worker in list(self._workers):
                run.dispatch(worker)
            while run.busy:
                now = time.monotonic()
                for fd in _readable(list(run.busy), 0.05):
                    worker = run.busy[fd]
                    messages = worker.receive()
                    if messages is None:  # died (e.g. out of memory) or spoke nonsense
                        run.replace(worker, timed_out=False)
                        continue
                    for message in messages:
                        if isinstance(message, dict):  # {"ready": true}: the clock starts now
                            worker.ready, self._failed_starts = True, 0
                        else:
                            on_result(message[0], message)
                            worker.pending = [p for p in worker.pending if p[0] != message[0]]
                        worker.last_progress = now
                    if worker.ready and not worker.pending:
                        del run.busy[fd]
                        run.dispatch(worker)
                for worker in list(run.busy.values()):
                    limit = timeout_s + 0.5 if worker.ready else STARTUP_LIMIT_S
                    if now - worker.last_progress > limit:
                        run.replace(worker, timed_out=worker.ready)
            finished = True
        finally:
            if not finished:
                for worker in run.busy.values():
                    worker.kill()
        return run.given_up


class _Run:
    """The state of one :meth:`WorkerPool.run`: the queue of chunks, the busy workers, deaths
    per item and the items given up."""

    def __init__(self, pool: WorkerPool, queue: deque, timeout_s: float):
        self.pool, self.queue, self.timeout_s = pool, queue, timeout_s
        self.busy: dict[int, _Worker] = {}
        self.deaths: dict[int, int] = {}
        self.given_up: list[GivenUp] = []

    def dispatch(self, worker: _Worker) -> None:
        if not self.queue:
            return
        chunk = self.queue.popleft()
        try:
            worker.send(chunk, self.timeout_s)
        except OSError:  # dead but not yet noticed: not the chunk's fault
            worker.pending = []
            self.queue.appendleft(chunk)
            self.replace(worker, timed_out=False)
            return
        self.busy[worker.fd] = worker

    def replace(self, worker: _Worker, timed_out: bool) -> None:
        """Replace a stuck or dead worker and requeue its unfinished items; the item it was on
        is given up if it overran the time limit or if a worker already died on it once."""
        pool = self.pool
        self.busy.pop(worker.fd, None)
        worker.kill()
        pool.restarts += 1
        rest = worker.pending
        if not worker.ready and rest:
            pool._failed_starts += 1
            if pool._failed_starts >= STARTUP_FAILURES:
                raise PoolError(
                    f"{pool._failed_starts} worker processes in a row died while starting; run "
                    f"`{sys.executable} -m nftune._verify_worker` to see the error")
        elif rest:
            head = rest[0][0]
            self.deaths[head] = self.deaths.get(head, 0) + 1
            if timed_out or self.deaths[head] >= 2:
                self.given_up.append(GivenUp(head, timed_out))
                rest = rest[1:]
        if rest:
            self.queue.appendleft(rest)
        fresh = _Worker(pool.memory_mb, pool.job)
        pool._workers[pool._workers.index(worker)] = fresh
        self.dispatch(fresh)
