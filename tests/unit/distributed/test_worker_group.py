"""RayWorkerGroup on a local 2-CPU Ray cluster: 2 CPU workers, gloo collectives, failures.

A failure must be reported while the other ranks are still running, never after them: in the
failure tests the other ranks block for good (as a peer waiting in a collective would), so a
group that waited for them would hang (and hit pytest's timeout) instead of raising.
"""

import os
import threading
import time

import pytest
import ray

from nemo_rl.distributed import (
    RayVirtualCluster,
    RayWorkerGroup,
    WorkerDiedError,
    WorkerError,
)
from nemo_rl.distributed.worker_group import _root_cause

pytestmark = pytest.mark.ray

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR")
ENV_KEYS += ("MASTER_PORT", "OMP_NUM_THREADS", "EXTRA_VAR")


# Worker classes live at module level so that Ray workers import them by name.
class EnvWorker:
    def __init__(self, tag: str):
        self.tag = tag

    def env(self) -> dict:
        return {k: os.environ.get(k) for k in ENV_KEYS} | {"cwd": os.getcwd(), "tag": self.tag}

    def echo(self, shard, *, suffix=""):
        return int(os.environ["RANK"]), shard, suffix

    def exit_on(self, rank: int) -> None:
        if int(os.environ["RANK"]) == rank:
            os._exit(3)  # a hard crash: no exception, the process is gone
        threading.Event().wait()  # the others wait for it for good, as in a collective


class InitFailsWorker:
    def __init__(self):
        if os.environ["RANK"] == "1":
            raise RuntimeError("cannot load the model on purpose")
        threading.Event().wait()  # as if waiting for rank 1 in a rendezvous it never joins


class GlooWorker:
    def __init__(self):
        from nemo_rl.distributed import init_torch_distributed

        self.rank, self.world_size, self.device = init_torch_distributed("cpu")

    def all_reduce(self, value: float) -> tuple:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value * (self.rank + 1)])
        dist.all_reduce(t)
        return t.item(), self.world_size, str(self.device), torch.get_num_threads()

    def all_reduce_or_raise(self, bad_rank: int) -> float:
        if self.rank == bad_rank:
            raise ValueError(f"bad shard on rank {bad_rank}")
        return self.all_reduce(1.0)[0]  # blocks: the bad rank never joins


@pytest.fixture
def cluster(local_ray):
    c = RayVirtualCluster(1, 2, use_gpus=False, placement_timeout_s=20)
    yield c
    c.shutdown()


@pytest.mark.slow  # new worker processes (seconds each); the gloo test below keeps a group in the fast tier
def test_env_sharding_and_results_in_rank_order(cluster):
    group = RayWorkerGroup(
        cluster, EnvWorker, init_kwargs={"tag": "t"}, env_vars={"EXTRA_VAR": "1"}
    )
    try:
        envs = group.run_all("env")
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
        node_ip = ray.util.get_node_ip_address()
        for e in envs:
            assert e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2" and e["NODE_RANK"] == "0"
            assert e["MASTER_ADDR"] == node_ip == group.master_addr
            assert e["MASTER_PORT"] == str(group.master_port) and 1024 < group.master_port < 65536
            assert e["OMP_NUM_THREADS"] == "1" and e["EXTRA_VAR"] == "1"
            assert e["cwd"] == os.getcwd() and e["tag"] == "t"
        assert [w.rank for w in group.workers] == [0, 1]

        assert group.run_sharded("echo", ["a", "b"], suffix="!") == [(0, "a", "!"), (1, "b", "!")]
        assert group.run_all("echo", "same") == [(0, "same", ""), (1, "same", "")]
        assert group.gather(group.run_sharded_async("echo", [1, 2])) == [(0, 1, ""), (1, 2, "")]
        with pytest.raises(ValueError, match="3 shards for 2 workers"):
            group.run_sharded("echo", [1, 2, 3])
        with pytest.raises(AttributeError, match="no method 'nope'"):
            group.run_all("nope")
    finally:
        group.shutdown()
        group.shutdown()  # idempotent


def test_gloo_all_reduce_then_a_raising_rank_is_reported_without_hanging(cluster):
    group = RayWorkerGroup(cluster, GlooWorker)
    try:
        # rank r contributes 10 * (r + 1): 10 + 20
        assert group.run_all("all_reduce", 10.0) == [(30.0, 2, "cpu", 1)] * 2

        futures = group.run_all_async("all_reduce_or_raise", 1)  # rank 0 waits in all_reduce for rank 1
        with pytest.raises(WorkerError) as info:
            group.gather(futures)
        assert _still_running(futures[0]), "the error should arrive while rank 0 is still in the collective"
        err = info.value
        assert not isinstance(err, WorkerDiedError)
        assert err.rank == 1 and err.exc_type == "ValueError"
        assert err.node_ip == ray.util.get_node_ip_address()
        message = str(err)
        assert "rank 1 of 2" in message and "bad shard on rank 1" in message
        assert "GlooWorker.all_reduce_or_raise()" in message
        assert (
            "Traceback (most recent call last)" in message and "in all_reduce_or_raise" in message
        )

        # Rank 0 is still stuck in the collective: a new call must fail, not queue behind it.
        with pytest.raises(RuntimeError, match="unusable after rank 1"):
            group.run_all("all_reduce", 1.0)
    finally:
        group.shutdown()


@pytest.mark.slow  # new worker processes; see the gloo test
def test_raise_in_init_is_reported_at_once_and_frees_the_slots(cluster):
    with pytest.raises(WorkerError) as info:
        RayWorkerGroup(cluster, InitFailsWorker)  # rank 0 never leaves __init__
    err = info.value
    assert err.rank == 1 and err.call == "InitFailsWorker.__init__()"
    assert "RuntimeError: cannot load the model on purpose" in str(err)
    assert "Traceback" in str(err) and "in __init__" in str(err)

    # The group killed its workers before raising: both bundles become free again (Ray
    # releases a killed actor's resources asynchronously; were they never freed, pytest's
    # timeout ends the wait).
    (pg,) = cluster.placement_groups()
    free_key = f"CPU_group_{pg.id.hex()}"
    while ray.available_resources().get(free_key, 0) < 2:
        time.sleep(0.1)
    assert ray.available_resources().get(free_key, 0) == 2


@pytest.mark.slow  # new worker processes; see the gloo test
def test_dead_worker_is_reported_with_its_rank(cluster):
    group = RayWorkerGroup(cluster, EnvWorker, init_kwargs={"tag": "t"})
    try:
        futures = group.run_all_async("exit_on", 1)
        with pytest.raises(WorkerDiedError) as info:
            group.gather(futures)
        assert _still_running(futures[0]), "the death should be reported while rank 0 still waits"
        err = info.value
        assert err.rank == 1 and err.node_ip == ray.util.get_node_ip_address()
        assert "rank 1 of 2" in str(err) and "EnvWorker.exit_on()" in str(err)
    finally:
        group.shutdown()


def _still_running(future) -> bool:
    ready, _ = ray.wait([future], timeout=0)
    return not ready


def _failure(rank, died=False, message="x"):
    cls = WorkerDiedError if died else WorkerError
    return cls(
        rank=rank,
        world_size=2,
        node_ip="10.0.0.1",
        hostname="h",
        call="W.f()",
        exc_type="RuntimeError",
        exc_message=message,
        worker_traceback="Traceback ...",
    )


def test_root_cause_prefers_the_dead_rank_over_its_peers_collective_errors():
    peer = _failure(0, message="Connection closed by peer")
    dead = _failure(1, died=True)
    root = _root_cause([peer, dead])  # the peer's error arrived first
    assert isinstance(root, WorkerDiedError) and root.rank == 1
    assert root.also_failed == ("rank 0 (RuntimeError: Connection closed by peer)",)
    assert "other ranks that failed meanwhile" in str(root)
    assert _root_cause([_failure(1), _failure(0)]).rank == 1  # no death: first to arrive
