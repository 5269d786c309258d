"""`dmsae serve` under real uvicorn in a subprocess, for the REST tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_ports

TOKEN = "test-token-0123456789abcdef"
ENV = {
    "RAY_AUTH_MODE": "disabled",  # no token auth between Ray clients and this cluster
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "OMP_NUM_THREADS": "1",
}
REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, without any pointer to another cluster."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "DMSAE_API_TOKEN")}
    return env | ENV | extra


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def _terminate(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait(10)


class Server:
    """`dmsae serve` in a subprocess; restartable on the same port, runs root and database."""

    def __init__(self, ray_address: str, root: Path, *extra_args: str) -> None:
        self.ray_address, self.root, self.extra_args = ray_address, root, list(extra_args)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "serve.log"

    def start(self, *, token_file: Path | None = None, token: bool = True) -> None:
        """``token``: False starts it without one (open, loopback only)."""
        env, args = _env(), []
        if token_file is None and token:
            env["DMSAE_API_TOKEN"] = TOKEN
        elif token_file is not None:
            args = ["--token-file", str(token_file)]
        cmd = [
            sys.executable,
            "-m",
            "dmsae_ray.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ray-address",
            self.ray_address,
            "--runs-root",
            str(self.root / "runs"),
            "--max-active-runs",
            "2",
            *self.extra_args,
            *args,
        ]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_http(f"{self.url}/healthz", self.proc, self.log, timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, timeout=30)


def stop_leftover_jobs(address: str) -> None:
    """A failed test can leave its run going: stop it so later tests get the whole cluster."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    # Only submitted jobs: the drivers of this test session are listed too, without an id.
    jobs = client.list_jobs()
    live = [j.submission_id for j in jobs if j.submission_id and not j.status.is_terminal()]
    for job_id in live:
        client.stop_job(job_id)
    deadline = time.monotonic() + 60
    while live and time.monotonic() < deadline:
        live = [j for j in live if not client.get_job_status(j).is_terminal()]
        time.sleep(1)


def read_events(api: httpx.Client, path: str, timeout: float = 300) -> list[dict]:
    """Every server-sent event of ``path`` until the server ends the stream."""
    events, event = [], {}
    with api.stream("GET", path, timeout=timeout) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event["event"] = line[7:]
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif line == "" and event:
                events.append(event)
                event = {}
    return events
