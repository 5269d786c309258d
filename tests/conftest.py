from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

# Ray on a 2-core CI machine (docs/architecture.md, "Ray on small machines"): no token auth,
# no state-actor polling, one footer reader; set before any Ray process starts so every child
# inherits them.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# The S3 test server (test_storage.py) takes any credentials; Ray workers inherit these from
# the cluster started below. No instance-metadata probe for credentials on a machine off EC2.
for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(key, value)

sys.path.insert(0, str(Path(__file__).parent))
from tiny import build_tiny_model, write_corpus  # noqa: E402

torch.set_num_threads(1)  # 2 cores shared with Ray workers: more threads only contend


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus.jsonl")
    model = build_tiny_model(root / "model", corpus)
    return {"root": root, "corpus": corpus, "model": model}


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir["model"], attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_dir["model"])


def tiny_config(tiny_dir: dict[str, Path], run_dir: Path, **sections) -> dict:
    """A run config on the tiny model that trains in seconds."""
    cfg = {
        "model": {"name": str(tiny_dir["model"]), "layer": 1, "dtype": "float32"},
        "data": {
            "dataset": str(tiny_dir["corpus"]),
            "context_length": 64,
            "attribution_sequences": 8,
            "eval_sequences": 4,
            "llm_batch_size": 16,
            "cache_activations": True,
        },
        "sae": {
            "width": 256,
            "k": 8,
            "dead_tokens": 5000,
            "threshold_start_step": 5,
            "norm_batches": 2,
        },
        "train": {
            "tokens_per_cycle": 4096,
            "batch_size": 256,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 8,
        },
        "attribution": {"batch_size": 4},
        "distill": {"cycles": 2},
        "ray": {"enabled": False},
        "run_dir": str(run_dir),
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One real local Ray cluster for the whole session (`ray start --head --block`), with the
    job server, so tests can both ray.init() against it and submit jobs to it. Every port is
    chosen free (another Ray cluster may run on this machine), and it is shut down by SIGTERM
    to its own process, never `ray stop` (which kills every Ray process of the machine)."""
    import ray

    gcs, dash, client, agent_http, agent_grpc, renv, metrics, nm, om = free_ports(9)
    log = tmp_path_factory.mktemp("ray") / "ray_start.log"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", "--num-cpus=4", "--num-gpus=0",
        "--temp-dir=/tmp/rt_ci",  # AF_UNIX socket paths must stay short
        "--node-ip-address=127.0.0.1", f"--object-store-memory={400 * 2**20}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={nm}",
        f"--object-manager-port={om}", "--disable-usage-stats",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"ray start --head failed:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)
    address = f"127.0.0.1:{gcs}"
    ray.init(address=address)
    try:
        yield {"address": address, "dashboard": dashboard}
    finally:
        ray.shutdown()
        proc.terminate()
        try:
            # `ray start --block` stops its processes one by one, slowly (half a minute after a
            # whole suite's jobs and actors); nothing of this throwaway cluster needs keeping.
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait(10)
