"""Run one instance of a plain Python class per reserved slot, as a Ray actor, and call it.

`RayWorkerGroup(cluster, MyWorker)` starts one actor per bundle of the `RayVirtualCluster`
(rank order: node group, then bundle), gives each the torch.distributed environment
(see `worker_env`), constructs `MyWorker(**init_kwargs)` in all of them concurrently, and
then calls methods on all ranks with replicated (`run_all`) or per-rank (`run_sharded`) data.

A worker that raises surfaces on the driver as `WorkerError` (rank, node, the worker's own
exception and traceback) as soon as it happens, even while the other ranks are stuck in a
collective waiting for it; a worker process that dies surfaces as `WorkerDiedError`.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nemo_rl.distributed.virtual_cluster import RayVirtualCluster

# After the first failure, how long to keep collecting the other ranks' outcomes. A dead
# rank also makes its peers' collectives fail (e.g. gloo "connection closed"), sometimes
# before Ray reports the death; waiting briefly lets the report name the root cause.
_FAILURE_GRACE_S = 1.0


class WorkerError(RuntimeError):
    """A worker raised. The message names the rank and node and holds the worker's traceback.

    Attributes:
        rank, world_size, node_ip, hostname: where it happened ("?" if not known yet).
        call: what the driver was running, e.g. "MyWorker.__init__()" or "a worker method".
        exc_type, exc_message, worker_traceback: the worker's exception, as text.
        also_failed: one line per other rank that failed in the same call.
    """

    rank: int
    world_size: int
    node_ip: str
    hostname: str
    call: str
    exc_type: str
    exc_message: str
    worker_traceback: str
    also_failed: tuple[str, ...]

    _detail_title = "worker traceback"

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        node_ip: str,
        hostname: str,
        call: str,
        exc_type: str,
        exc_message: str,
        worker_traceback: str,
        also_failed: tuple[str, ...] = (),
    ):
        self._fields = dict(
            rank=rank,
            world_size=world_size,
            node_ip=node_ip,
            hostname=hostname,
            call=call,
            exc_type=exc_type,
            exc_message=exc_message,
            worker_traceback=worker_traceback,
            also_failed=tuple(also_failed),
        )
        self.__dict__.update(self._fields)  # the attributes annotated above
        lines = [
            f"rank {rank} of {world_size} (node {node_ip}, host {hostname}) failed in {call}: "
            f"{exc_type}: {exc_message}",
            f"--- {self._detail_title} (rank {rank}) ---",
            worker_traceback.rstrip(),
        ]
        if also_failed:
            lines += ["--- other ranks that failed meanwhile ---", *also_failed]
        super().__init__("\n".join(lines))

    def summary(self) -> str:
        """One line: rank and exception, e.g. "rank 1 (ValueError: bad shard)"."""
        first_line = (self.exc_message.splitlines() or [""])[0]
        return f"rank {self.rank} ({self.exc_type}: {first_line})"

    def with_also_failed(self, others: list[WorkerError]) -> WorkerError:
        return type(self)(**{**self._fields, "also_failed": tuple(o.summary() for o in others)})

    def __reduce__(self):  # keyword-only __init__: rebuild from the fields when unpickled
        return _rebuild_error, (type(self), self._fields)


def _rebuild_error(cls: type[WorkerError], fields: dict) -> WorkerError:
    return cls(**fields)


class WorkerDiedError(WorkerError):
    """A worker process died (killed, OOM, segfault, os._exit) or could not start.

    `worker_traceback` holds Ray's report instead: pid, exit detail, OOM hints.
    """

    _detail_title = "Ray's report on the dead worker"


class WorkerFutures(list):
    """One call's per-rank futures (rank order); `RayWorkerGroup.gather` makes them results."""

    def __init__(self, refs: list[ray.ObjectRef], call: str):
        super().__init__(refs)
        self.call = call  # e.g. "MyWorker.train()", for error messages


@dataclass(frozen=True)
class WorkerInfo:
    """Where one rank runs."""

    rank: int
    local_rank: int
    local_world_size: int
    node_rank: int
    node_ip: str
    hostname: str
    node_id: str
    pid: int  # of the worker process on its node (for py-spy, top, kill)


class RayWorkerGroup:
    """`cluster.world_size` instances of `worker_cls`, one per reserved bundle.

    Args:
        cluster: the reserved slots; one worker per bundle.
        worker_cls: a plain (undecorated) class importable by the workers. Its `__init__`
            may call `worker_env.init_torch_distributed(...)`: all ranks construct at once.
        init_kwargs: keyword arguments of `worker_cls(...)`, the same on every rank.
        env_vars: extra environment for every worker process, set before it starts.
        name_prefix: workers show up as "<name_prefix>-<rank>" in Ray's log prefixes.

    Raises:
        WorkerError / WorkerDiedError: a worker failed to start or its `__init__` raised;
            the group's actors are killed before this is raised.
    """

    def __init__(
        self,
        cluster: RayVirtualCluster,
        worker_cls: type,
        *,
        init_kwargs: dict | None = None,
        env_vars: dict[str, str] | None = None,
        name_prefix: str = "worker",
    ):
        self.world_size = cluster.world_size
        self._worker_cls = worker_cls
        self._failure: WorkerError | None = None
        self._node_of_rank: list[tuple[str, str]] = [("?", "?")] * self.world_size

        # Set at process start, so they hold before any library reads them at import time.
        process_env = {"OMP_NUM_THREADS": str(cluster.cpus_per_worker), **(env_vars or {})}
        self._hosts = []
        for pg in cluster.placement_groups():
            for bundle_index in range(cluster.workers_per_node):
                self._hosts.append(
                    _WorkerHost.options(
                        num_cpus=cluster.cpus_per_worker,
                        num_gpus=1 if cluster.use_gpus else 0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, bundle_index),
                        runtime_env={"env_vars": process_env},
                    ).remote(f"{name_prefix}-{len(self._hosts)}", os.getcwd())
                )

        try:
            nodes = self._gather([h.node_info.remote() for h in self._hosts], "worker startup")
            self.workers = _place_ranks(nodes)
            self._node_of_rank = [(w.node_ip, w.hostname) for w in self.workers]
            self.master_addr = self.workers[0].node_ip
            # Asked of rank 0 itself: the port must be free on rank 0's node.
            (self.master_port,) = self._gather(
                [self._hosts[0].free_port.remote()], "worker startup"
            )
            self._gather(
                [
                    host.start.remote(worker_cls, init_kwargs or {}, self._rank_env(w))
                    for host, w in zip(self._hosts, self.workers, strict=True)
                ],
                self._call_name("__init__"),
            )
        except BaseException:
            self.shutdown()  # the caller never gets the group, so nothing else could free it
            raise

    def run_all(self, method: str, /, *args, **kwargs) -> list:
        """`worker.method(*args, **kwargs)` on every rank; the results in rank order."""
        return self.gather(self.run_all_async(method, *args, **kwargs))

    def run_sharded(self, method: str, /, shards: list, **common_kwargs) -> list:
        """`worker.method(shards[rank], **common_kwargs)` on every rank; results in rank order."""
        return self.gather(self.run_sharded_async(method, shards, **common_kwargs))

    def run_all_async(self, method: str, /, *args, **kwargs) -> WorkerFutures:
        """Like `run_all`, but returns at once; `gather` the futures for the results."""
        self._check_usable(method)
        refs = [h.call.remote(method, *args, **kwargs) for h in self._hosts]
        return WorkerFutures(refs, self._call_name(method))

    def run_sharded_async(self, method: str, /, shards: list, **common_kwargs) -> WorkerFutures:
        """Like `run_sharded`, but returns at once; `gather` the futures for the results."""
        if len(shards) != self.world_size:
            raise ValueError(
                f"run_sharded({method!r}): {len(shards)} shards for {self.world_size} workers"
            )
        self._check_usable(method)
        refs = [
            h.call.remote(method, s, **common_kwargs)
            for h, s in zip(self._hosts, shards, strict=True)
        ]
        return WorkerFutures(refs, self._call_name(method))

    def gather(self, futures: WorkerFutures) -> list:
        """The results of one call's futures in rank order; raises as soon as any rank fails.

        Raises:
            WorkerError: a rank raised (its rank, node and traceback in the message).
            WorkerDiedError: a rank's process died.
        """
        return self._gather(futures, getattr(futures, "call", "a worker method"))

    def describe(self) -> str:
        """Where each rank runs: "rank 0 pid 4242 on host-a (10.0.0.1), rank 1 pid ..."."""
        return ", ".join(f"rank {w.rank} pid {w.pid} on {w.hostname} ({w.node_ip})" for w in self.workers)

    def shutdown(self) -> None:
        """Kill the workers; idempotent, and safe after a failure or after Ray has shut down."""
        hosts, self._hosts = self._hosts, []
        if ray.is_initialized():
            for host in hosts:
                ray.kill(host, no_restart=True)

    def _check_usable(self, method: str) -> None:
        if not self._hosts:
            raise RuntimeError("this RayWorkerGroup has been shut down")
        if self._failure is not None:
            # The other ranks may still be blocked in the failed call (e.g. in a collective);
            # a new call would queue behind it forever.
            raise RuntimeError(
                f"this RayWorkerGroup is unusable after {self._failure.summary()} failed in "
                f"{self._failure.call}; call shutdown() and start a new group"
            )
        if not callable(getattr(self._worker_cls, method, None)):
            raise AttributeError(f"{self._worker_cls.__qualname__} has no method {method!r}")

    def _call_name(self, method: str) -> str:
        return f"{self._worker_cls.__qualname__}.{method}()"

    def _rank_env(self, w: WorkerInfo) -> dict[str, str]:
        return {
            "RANK": str(w.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(w.local_rank),
            "LOCAL_WORLD_SIZE": str(w.local_world_size),
            "NODE_RANK": str(w.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def _gather(self, futures: list[ray.ObjectRef], call: str) -> list:
        """Results of futures[rank]; on a failure, raise it without waiting for the rest."""
        rank_of = {ref: rank for rank, ref in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        failures: list[WorkerError] = []
        pending, deadline = list(futures), None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                break  # grace period over; the ranks still running are left to the caller
            rank = rank_of[ready[0]]
            try:
                results[rank] = ray.get(ready[0])
            except RayError as e:
                failures.append(self._to_worker_error(e, rank, call))
                deadline = deadline or time.monotonic() + _FAILURE_GRACE_S
        if not failures:
            return results
        self._failure = _root_cause(failures)
        raise self._failure from None

    def _to_worker_error(self, e: RayError, rank: int, call: str) -> WorkerError:
        node_ip, hostname = self._node_of_rank[rank]
        where = dict(
            rank=rank, world_size=self.world_size, node_ip=node_ip, hostname=hostname, call=call
        )
        if isinstance(e, RayTaskError) and isinstance(e.cause, _WorkerException):
            exc_type, exc_message, tb = e.cause.args
            return WorkerError(
                **where, exc_type=exc_type, exc_message=exc_message, worker_traceback=tb
            )
        if isinstance(e, RayActorError):
            # Ray's text says how it died (exit detail, pid, OOM hints).
            return WorkerDiedError(
                **where,
                exc_type=type(e).__name__,
                exc_message="the worker process died",
                worker_traceback=str(e),
            )
        # Raised by Ray around the call, e.g. an argument that failed to deserialize.
        cause = getattr(e, "cause", None) or e
        tb = getattr(e, "traceback_str", None) or str(e)
        return WorkerError(
            **where, exc_type=type(cause).__name__, exc_message=str(cause), worker_traceback=tb
        )


def _root_cause(failures: list[WorkerError]) -> WorkerError:
    """The failure to report (the others listed in it): a death, else the first to arrive.

    A dead rank makes its peers' collectives fail too, sometimes before Ray reports the death.
    """
    ordered = sorted(failures, key=lambda f: not isinstance(f, WorkerDiedError))  # stable
    return ordered[0].with_also_failed(ordered[1:]) if len(ordered) > 1 else ordered[0]


def _place_ranks(nodes: list[tuple[str, str, str, int]]) -> list[WorkerInfo]:
    """Local ranks and node ranks from where each rank actually runs ((ip, hostname, node_id, pid))."""
    node_ids = list(dict.fromkeys(node[2] for node in nodes))  # first-seen order
    ranks_on = {nid: [r for r, n in enumerate(nodes) if n[2] == nid] for nid in node_ids}
    return [
        WorkerInfo(
            rank=rank,
            local_rank=ranks_on[node_id].index(rank),
            local_world_size=len(ranks_on[node_id]),
            node_rank=node_ids.index(node_id),
            node_ip=ip,
            hostname=hostname,
            node_id=node_id,
            pid=pid,
        )
        for rank, (ip, hostname, node_id, pid) in enumerate(nodes)
    ]


class _WorkerException(Exception):
    """A worker's exception as text (type, message, traceback): always picklable."""


def _run_user_code(fn, args, kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        exc_type = type(e).__qualname__
        if type(e).__module__ not in ("builtins", "__main__"):
            exc_type = f"{type(e).__module__}.{exc_type}"
        # tb_next: start the traceback at the user's code, not at this wrapper.
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
        raise _WorkerException(exc_type, str(e), tb) from None


@ray.remote(max_restarts=0)
class _WorkerHost:
    """The actor around one worker: sets its environment, constructs it, forwards calls."""

    def __init__(self, label: str, driver_cwd: str):
        self._label = label
        self._worker = None
        # Relative paths (data, checkpoints) mean the same on workers as on the driver.
        if os.path.isdir(driver_cwd):
            os.chdir(driver_cwd)

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return self._label

    def node_info(self) -> tuple[str, str, str, int]:
        return (
            ray.util.get_node_ip_address(),
            socket.gethostname(),
            ray.get_runtime_context().get_node_id(),
            os.getpid(),
        )

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, worker_cls: type, init_kwargs: dict, rank_env: dict[str, str]) -> None:
        os.environ.update(rank_env)
        self._worker = _run_user_code(worker_cls, (), init_kwargs)

    def call(self, method: str, /, *args, **kwargs):
        return _run_user_code(getattr(self._worker, method), args, kwargs)
