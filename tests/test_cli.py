import json
import subprocess
import sys

import yaml
from conftest import tiny_config


def dmsae(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmsae_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def test_help_explains_every_subcommand():
    out = dmsae("--help")
    assert out.returncode == 0
    for word in ("run", "status", "config", "distillation", "tau"):
        assert word in out.stdout
    run_help = dmsae("run", "--help").stdout
    assert "--config" in run_help and "--set" in run_help and "resume" in run_help


def test_bad_config_exits_2_naming_the_field(tmp_path):
    out = dmsae("run", "--set", "distill.tau=1.5", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "distill.tau" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()
    bad = tmp_path / "typo.yaml"
    bad.write_text("sae:\n  widht: 4\n")
    out = dmsae("run", "--config", str(bad))
    assert out.returncode == 2 and "sae.widht" in out.stderr and "unknown key" in out.stderr


def test_run_and_status_from_the_command_line(tiny_dir, tmp_path):
    path = tmp_path / "tiny.yaml"
    cfg = tiny_config(tiny_dir, tmp_path / "run", distill={"cycles": 1})
    path.write_text(yaml.safe_dump(cfg))
    out = dmsae("run", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "[cycle 1] core" in out.stdout and "jaccard" in out.stdout
    status = dmsae("status", str(tmp_path / "run"))
    assert status.returncode == 0 and "completed" in status.stdout and "cycle 1:" in status.stdout
    raw = json.loads(dmsae("status", str(tmp_path / "run"), "--json").stdout)
    assert raw["status"] == "completed" and len(raw["cycles"]) == 2
    assert dmsae("status", str(tmp_path)).returncode == 2
