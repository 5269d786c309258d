"""Losing a worker node while a cycle trains, on a Ray cluster of three nodes on this machine:
a head without CPUs (GCS, the driver's node) and two worker nodes, each a separate
`ray start --block` in its own session. Every process of the node running the training workers
is SIGKILLed once a checkpoint is registered; the run completes in the same `dmsae run`, Ray
Train restarting the worker group from that checkpoint on the node left, and its committed
cycle equals that of a clean run of the same config bit for bit. The clean run trains at the
same time on the session's one-node cluster (`ray_head`): the same bits on another cluster's
layout, and the test takes the time of one run, not two. That equality rests on the workers
sharding the cached activations by token block (`training.shard_by_block`), tested here without
Ray too.

The three-node cluster is this module's own: the pytest process never connects to it, the run
there is a `dmsae run` subprocess, and it is torn down by signals to the processes it started,
never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_ports, tiny_config

from dmsae_ray.config import validate
from dmsae_ray.distributed.training import _batches, shard_by_block
from dmsae_ray.run import pipeline

RAY = {"enabled": True, "num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 2}
# Ray's defaults declare a silent node dead after about 15 s (5 failed health checks, 3 s
# apart); a second or two is enough on loopback and keeps the test short.
FAST_NODE_DEATH = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # state ppid pgrp session


def _members(sid: int) -> list[int]:
    """Every live process of a session: a node's `ray start`, raylet, agents and workers
    (Ray workers get process groups of their own, but stay in the session)."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [p for p in pids if p != os.getpid() and _session(p) == sid]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Node:
    def __init__(self, name: str, temp_dir: Path, head: str | None, cpus: int) -> None:
        nm, om, metrics, agent_http, agent_grpc, renv, gcs, client = free_ports(8)
        self.name, self.address = name, f"127.0.0.1:{gcs}"
        self.log = temp_dir / f"{name}.log"
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
            f"--num-cpus={cpus}", "--num-gpus=0",
            f"--temp-dir={temp_dir / name}",  # one per node; AF_UNIX paths stay short
            "--node-ip-address=127.0.0.1", f"--object-store-memory={200 * 2**20}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}",
            "--disable-usage-stats",
        ]
        if head is None:
            cmd += ["--head", f"--port={gcs}", "--include-dashboard=false",
                    f"--ray-client-server-port={client}"]
        else:
            cmd += [f"--address={head}"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=os.environ | FAST_NODE_DEATH,
            )

    def wait_started(self, deadline: float) -> None:
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start ({self.name}) failed:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def processes(self) -> list[int]:
        """The node's live processes, by the session its `ray start` leads. Once that process
        is gone, its pid may be reused by another session's leader: then none are ours."""
        pid = self.proc.pid
        if self.proc.poll() is not None and Path(f"/proc/{pid}").exists():
            return []
        return _members(pid)

    def _signal(self, sig: int) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Every process of the node at once, as when a machine goes away."""
        self._signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, wait_until: float) -> None:
        """After ``terminate``: what has not exited by ``wait_until`` is SIGKILLed."""
        try:
            self.proc.wait(max(0.0, wait_until - time.time()))
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)  # whatever outlived it
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops its node's processes


@pytest.fixture(scope="module")
def cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="rt_mn", dir="/tmp"))
    nodes: list[Node] = []
    try:
        deadline = time.time() + 180
        # No CPUs on the head: every task and actor that needs one (training workers, Ray
        # Data reads, scoring actors) runs on a worker node. The driver connects through the
        # head, where the Train controller (pinned to the driver's node) stays.
        head = Node("head", temp_dir, None, cpus=0)
        nodes.append(head)
        head.wait_started(deadline)
        nodes += [Node(f"worker{i}", temp_dir, head.address, cpus=2) for i in (1, 2)]
        for node in nodes[1:]:
            node.wait_started(deadline)
        yield {"address": head.address, "head": head, "workers": nodes[1:]}
    finally:
        for node in reversed(nodes):
            node.terminate()
        wait_until = time.time() + 5  # Ray stops a node's processes one by one, slowly
        for node in nodes:
            node.stop(wait_until)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _config(tiny_dir, tmp_path: Path, name: str) -> Path:
    cfg = tiny_config(
        tiny_dir,
        tmp_path / name,
        # Both runs read one activation cache, and no norm factor is estimated: the second run
        # runs the LM only to evaluate and attribute.
        data={"activation_cache": str(tmp_path / "acts")},
        sae={"normalize_activations": False},
        # 32 steps, a checkpoint every 4: time to lose a node after the first one.
        train={"tokens_per_cycle": 32 * 256, "log_every": 4, "checkpoint_every": 4},
        distill={"cycles": 0},
        ray=RAY,
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path, address: str) -> subprocess.Popen:
    """`dmsae run` against the cluster; its output goes to a file next to the config (a pipe
    nobody reads while the test waits for a checkpoint could fill and stall the driver)."""
    with path.with_suffix(".log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dmsae_ray.cli", "run", "--config", str(path)],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"RAY_ADDRESS": address},
        )


def _train_worker_node(workers: list[Node]) -> Node | None:
    for node in workers:
        if any("RayTrainWorker" in _cmdline(p) for p in node.processes()):
            return node
    return None


def _finish(proc: subprocess.Popen) -> str:
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:  # timed out: no driver outlives the test
            proc.kill()
            proc.wait()
    return Path(proc.args[-1]).with_suffix(".log").read_text()


def test_losing_a_worker_node_mid_cycle(cluster, ray_head, tiny_dir, tmp_path):
    t0 = time.time()
    clean_cfg = validate(yaml.safe_load(_config(tiny_dir, tmp_path, "clean").read_text()))
    with ThreadPoolExecutor(1) as pool:
        # the pytest process is connected to ray_head: the clean run's driver is this process
        clean = pool.submit(pipeline.run, clean_cfg, log=lambda line: None)

        run_dir = tmp_path / "lossy"
        proc = _run(_config(tiny_dir, tmp_path, "lossy"), cluster["address"])
        # Written by the Train controller once it has registered a checkpoint of cycle 0
        registered = run_dir / "ray_train" / "cycle-000" / "checkpoint_manager_snapshot.json"
        killed = None
        deadline = time.time() + 600
        while killed is None and proc.poll() is None and time.time() < deadline:
            if registered.is_file():
                killed = _train_worker_node(cluster["workers"])
                if killed is not None:
                    killed.kill()
            time.sleep(0.1)
        out = _finish(proc)
        assert clean.result(timeout=600)["status"] == "completed"
    assert killed is not None, "cycle 0 ended before a worker node could be killed\n" + out
    assert not killed.processes()
    assert proc.returncode == 0, out[-6000:]
    print(f"clean run and run with a lost node, side by side: {time.time() - t0:.0f}s")

    state = json.loads((run_dir / "state.json").read_text())
    ref = json.loads((tmp_path / "clean/state.json").read_text())
    assert state["status"] == "completed" and [s["cycle"] for s in state["cycles"]] == [0]
    # Ray Train restarted the worker group within this one `dmsae run`, from a checkpoint
    train, ref_train = state["cycles"][0]["train"], ref["cycles"][0]["train"]
    assert 4 <= train["resumed_from"] < 32 and ref_train["resumed_from"] == 0, train
    assert train | {"resumed_from": 0} == ref_train  # the same final-window metrics
    ours = json.loads((run_dir / "cycles/000/core.json").read_text())
    theirs = json.loads((tmp_path / "clean/cycles/000/core.json").read_text())
    assert ours["ids"] == theirs["ids"] and ours["indices"] == theirs["indices"]
    assert ours["candidate_scores"] == theirs["candidate_scores"]  # bit for bit
    assert state["cycles"][0]["eval"] == ref["cycles"][0]["eval"]


class _Shard:
    """A dataset shard handing the rows on in a shuffled order, in batches of random size, as
    Ray Data may: rows ``{"x": [pos, ...], "pos": pos}``."""

    def __init__(self, n: int, seed: int) -> None:
        rows = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))  # the same data
        gen = torch.Generator().manual_seed(seed)  # in another order and chunking
        self.pos = torch.randperm(n, generator=gen)
        self.x = torch.cat([self.pos[:, None].float(), rows[self.pos]], 1)
        self.cuts = torch.randint(1, 40, (n,), generator=gen).tolist()

    def iter_torch_batches(self, batch_size: int, dtypes: dict):
        i = 0
        for cut in self.cuts:
            if i >= len(self.pos):
                return
            yield {"x": self.x[i : i + cut], "pos": self.pos[i : i + cut]}
            i += cut


@pytest.mark.parametrize("rank", [0, 1])
def test_block_shards_do_not_depend_on_the_order_rows_arrive_in(rank):
    """What `shard_by_block` promises: a worker's batches depend on its rank, not on the order
    or chunking in which the unsplit dataset reaches it, and a restart after `done` steps
    continues with exactly the batches an uninterrupted worker trains on next."""
    context, world = 8, 2

    def keep(pos):
        return (pos // context) % world == rank

    def batches(seed: int, done: int = 0) -> list:
        it = _batches(_Shard(1000, seed), 16, torch.device("cpu"), 5, 2**20, done, keep)
        return [next(it) for _ in range(40 - done)]  # over several epochs

    ours, theirs = batches(seed=1), batches(seed=2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(batches(3, done=13), ours[13:], strict=True))
    pos = torch.cat(ours)[:, 0].long()
    assert ((pos // context) % world == rank).all()  # only this rank's token blocks


def test_only_a_cache_that_fits_is_sharded_by_block():
    class Dataset:
        def count(self) -> int:
            return 1000

    def cfg(workers: int, cache: bool, mb: int):
        return validate({
            "ray": {"num_workers": workers},
            "data": {"cache_activations": cache},
            "train": {"epoch_cache_mb": mb},
        })

    d_in = 2**20 // 4000  # 1000 float32 rows of d_in: just under 1 MB
    assert shard_by_block(cfg(2, True, 1), Dataset(), d_in)
    assert not shard_by_block(cfg(1, True, 1), Dataset(), d_in)  # one worker: no split at all
    assert not shard_by_block(cfg(2, False, 1), Dataset(), d_in)  # the LM would run N times
    assert not shard_by_block(cfg(2, True, 1), Dataset(), 2 * d_in)  # N reads over the budget
