"""`dmsae transfer` on the tiny model: three real training runs per k, one table."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from shared_runs import finished_core_run

from dmsae_ray import cli
from dmsae_ray.config import ConfigError
from dmsae_ray.run.rundir import RunDir
from dmsae_ray.tools.report import build_report
from dmsae_ray.tools.transfer import METRICS, parse_ks, random_core, read_table, run_transfer

KS = [4, 16]
SEEDS = 2  # the fewest that give a standard error; the default is 3


@pytest.fixture(scope="module")
def core_run(tiny_dir, tmp_path_factory):
    return finished_core_run(tiny_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def transfer(core_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    lines: list[str] = []
    rows = run_transfer(core_run, KS, out=out, seeds=SEEDS, log=lines.append)
    return out, rows, lines


def test_every_k_and_seed_has_three_rows_from_real_runs(core_run, transfer):
    out, rows, _ = transfer
    core, distilled = RunDir(core_run).load_distilled_core()
    core_vectors = core.vectors
    c = len(distilled["ids"])
    core_nf = RunDir(core_run).load_state()["norm_factor"]
    assert [(r["seed"], r["k"], r["variant"]) for r in rows] == [
        (s, k, v) for s in range(SEEDS) for k in KS for v in ("distilled", "baseline", "random")
    ]
    for r in rows:
        rd = RunDir(r["run_dir"])
        state = rd.load_state()
        assert state["status"] == "completed" and len(state["cycles"]) == 1
        assert state["norm_factor"] == core_nf  # the frozen core sees its own input scale
        cfg = json.loads(rd.config_path.read_text())
        assert cfg["sae"]["k"] == r["k"] and cfg["sae"]["l0_budget"] == "dynamic"
        assert cfg["train"]["seed"] == r["seed"]
        assert cfg["sae"]["width"] == 256 and cfg["train"]["tokens_per_cycle"] == 4096
        ev = state["cycles"][0]["eval"]
        assert all(r[m] == ev[m] for m in METRICS)  # the row is that run's own evaluation
        # Only the evaluation is compared: no attribution through the LM, nothing selected.
        assert state["cycles"][0]["fraction"] is None and state["cycles"][0]["core_size"] == 0
        assert rd.load_core(0)["indices"] == []
        sae = rd.load_sae(0)
        assert sae.c == r["core_size"] == (0 if r["variant"] == "baseline" else c)
        assert 0 < r["l0"] and r["core_l0"] <= r["l0"]
        if r["variant"] == "baseline":
            assert r["core_l0"] == 0
        if r["variant"] == "distilled":
            assert torch.equal(sae.W_enc_core, core_vectors)


def test_random_core_is_a_subset_of_cycle_0_g0_latents(core_run, transfer):
    out, rows, _ = transfer
    random, summary = RunDir(out / "random_core_seed0").load_distilled_core()
    vectors = random.vectors
    sae0 = RunDir(core_run).load_sae(0)
    c = len(RunDir(core_run).load_distilled_core()[1]["ids"])
    assert len(summary["ids"]) == c and all(i[0] == 0 for i in summary["ids"])
    # The tiny G_0 (8 latents) is smaller than this core, so the pool runs on into G_1.
    end = next(e for e in sae0.group_ends if e - sae0.c >= c)
    assert summary["pool"] == [sae0.c, end]
    assert all(sae0.c <= i < end for i in summary["indices"])
    small, small_summary = random_core(core_run, 5, seed=3)
    assert all(sae0.c <= i < sae0.group_ends[0] for i in small_summary["indices"])
    assert torch.equal(small.vectors, sae0.W_enc[:, small_summary["indices"]])
    assert torch.equal(small.bias, sae0.b_enc[small_summary["indices"]].detach())
    assert torch.equal(vectors, sae0.W_enc[:, summary["indices"]])
    rand_run = next(r["run_dir"] for r in rows if r["variant"] == "random")
    assert torch.equal(RunDir(rand_run).load_sae(0).W_enc_core, vectors)
    again, _ = random_core(core_run, c, seed=0)
    assert torch.equal(again.vectors, vectors)  # the control is reproducible
    # every seed draws its own subset, and that seed's random runs use it
    _, other = RunDir(out / "random_core_seed1").load_distilled_core()
    assert other["seed"] == 1 and other["indices"] != summary["indices"]
    rand1 = next(r["run_dir"] for r in rows if r["variant"] == "random" and r["seed"] == 1)
    assert torch.equal(RunDir(rand1).load_sae(0).W_enc_core, sae0.W_enc[:, other["indices"]])


def test_tables_are_written(core_run, transfer):
    out, rows, _ = transfer
    with (out / "transfer.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 3 * len(KS) * SEEDS
    parsed = read_table(out / "transfer.csv")
    assert [r["fve"] for r in parsed] == pytest.approx([r["fve"] for r in rows])
    assert [r["seed"] for r in parsed] == [r["seed"] for r in rows]
    md = (out / "transfer.md").read_text()
    assert md.count(f"| distilled | {SEEDS} |") == len(KS)  # one point per k, over the seeds
    assert md.count(f"| baseline | {SEEDS} |") == len(KS)
    assert "## Distilled minus baseline at the same measured L0" in md
    assert "## Distilled minus random at the same measured L0" in md
    meta = json.loads((out / "transfer.json").read_text())
    assert meta["core_size"] == rows[0]["core_size"] and len(meta["rows"]) == len(rows)
    # each point is the mean of its seeds' measured values, with their standard error
    for p in meta["points"]:
        l0s = [r["l0"] for r in rows if (r["k"], r["variant"]) == (p["k"], p["variant"])]
        assert p["n"] == SEEDS and p["mean"]["l0"] == pytest.approx(sum(l0s) / len(l0s))
        assert p["se"]["l0"] == pytest.approx(abs(l0s[0] - l0s[1]) / 2)
    # the distilled curve is read against the others at its own measured L0
    verdicts = {"better", "worse", "within noise", "out of range", "no noise estimate"}
    for other in ("baseline", "random"):
        comps = meta["comparisons"][other]
        assert len(comps) == len(KS) * 9 and {c["verdict"] for c in comps} <= verdicts
        for c in comps:
            if c["verdict"] != "out of range":
                assert c["diff"] == pytest.approx(c["value"] - c["other"])
    files = build_report(core_run, transfer=out / "transfer.csv", out=out / "report")
    assert files["transfer_metrics"].stat().st_size > 1000


def test_a_rerun_resumes_instead_of_retraining(core_run, transfer, capsys):
    out, rows, _ = transfer
    before = {r["run_dir"]: load_file(f"{r['run_dir']}/cycles/000/sae/dmsae_state.safetensors")
              for r in rows}
    args = ["transfer", "--core", str(core_run), "--k", ",".join(map(str, KS)),
            "--out", str(out), "--seeds", str(SEEDS)]
    assert cli.main(args) == 0
    assert "already completed" in capsys.readouterr().out
    for r in read_table(out / "transfer.csv"):
        after = load_file(f"{r['run_dir']}/cycles/000/sae/dmsae_state.safetensors")
        assert torch.equal(after["W_dec"], before[r["run_dir"]]["W_dec"])


def test_bad_transfer_arguments(core_run, tmp_path, capsys):
    with pytest.raises(ConfigError):
        parse_ks("20,x")
    assert parse_ks("20, 40") == [20, 40]
    assert cli.main(["transfer", "--core", str(core_run), "--k", "256", "--out",
                     str(tmp_path)]) == 2
    assert "smaller than sae.width" in capsys.readouterr().err
    assert cli.main(["transfer", "--core", str(tmp_path), "--k", "4"]) == 2
    assert "no distilled core" in capsys.readouterr().err
