"""dmsae_ray/run/sweep_summary.py on hand-made trial directories: what a trial's run directory says
(state.json, core/core.json) becomes one row of summary.json/.csv/.md."""

from __future__ import annotations

import csv
import json

from dmsae_ray.run.sweep_plan import EVAL_METRICS, SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD
from dmsae_ray.run.sweep_summary import (
    cycle_metrics,
    selected_every_cycle,
    summarize,
    trial_done,
    trial_row,
    write_summary,
)


def cycle(n, core_size, jaccard, fve, core_l0, seconds, **ev):
    return {
        "cycle": n, "core_in": 0 if n == 0 else 3, "core_size": core_size, "jaccard": jaccard,
        "fraction": 0.9, "seconds": seconds, "train": {"mse": 0.1},
        "eval": {"fve": fve, "core_l0": core_l0, "l0": 8.0, "kl_div_score": 0.5} | ev,
    }


def write_trial(run_dir, status, cycles, error=None, history=None):
    run_dir.mkdir(parents=True)
    state = {"status": status, "cycle": len(cycles), "cycles": cycles, "error": error}
    (run_dir / "state.json").write_text(json.dumps(state))
    if history is not None:
        (run_dir / "core").mkdir()
        (run_dir / "core" / "core.json").write_text(json.dumps({"history": history}))


def make_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    trials = sweep / "trials"
    write_trial(
        trials / "t0", "completed",
        [cycle(0, 3, None, 0.85, 2.0, 10.0), cycle(1, 4, 0.5, 0.80, 3.0, 12.0)],
        history=[[[0, 1], [0, 2], [0, 7]], [[0, 1], [1, 4], [0, 7], [1, 9]]],
    )
    write_trial(trials / "t1", "running", [cycle(0, 5, None, 0.9, 1.0, 8.0)],
                history=[[[0, 1]]])  # not completed: its core.json is not read
    write_trial(trials / "t2", "failed", [], error="OSError: disk full")
    plan = {
        "name": "taus",
        "sweep_dir": str(sweep),
        "keys": ["distill.tau"],
        "trials": [
            {"name": "t0", "params": {"distill.tau": 0.8}, "run_dir": str(trials / "t0")},
            {"name": "t1", "params": {"distill.tau": 0.9}, "run_dir": str(trials / "t1")},
            {"name": "t2", "params": {"distill.tau": 0.95}, "run_dir": str(trials / "t2")},
            {"name": "t3", "params": {"distill.tau": 0.99}, "run_dir": str(trials / "t3")},
        ],
    }
    return sweep, plan


def test_trial_done_only_for_a_completed_state(tmp_path):
    assert not trial_done(tmp_path / "missing")
    write_trial(tmp_path / "running", "running", [])
    assert not trial_done(tmp_path / "running")
    write_trial(tmp_path / "done", "completed", [])
    assert trial_done(tmp_path / "done")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "state.json").write_text('{"status": "compl')  # mid-write
    assert not trial_done(tmp_path / "half")


def test_selected_every_cycle_intersects_the_history_by_persistent_id():
    assert selected_every_cycle(None) is None
    assert selected_every_cycle({}) is None
    assert selected_every_cycle({"history": []}) is None
    history = [[[0, 1], [0, 2], [0, 5]], [[0, 1], [1, 2], [0, 5]], [[0, 5], [0, 1], [2, 0]]]
    assert selected_every_cycle({"history": history}) == 2  # (0, 1) and (0, 5)
    assert selected_every_cycle({"history": [[[0, 1]], []]}) == 0


def test_cycle_metrics_are_flat_without_none():
    first = cycle(0, 3, None, 0.85, 2.0, 10.0, ce_loss_score=0.7)
    out = cycle_metrics(first)
    assert "jaccard" not in out  # None in cycle 0
    assert out == {
        "cycle": 0, "core_in": 0, "core_size": 3, "fraction": 0.9, "seconds": 10.0,
        "fve": 0.85, "core_l0": 2.0, "l0": 8.0, "ce_loss_score": 0.7,
    }
    assert set(out) - {"cycle", "core_in", "core_size", "fraction", "seconds"} <= set(EVAL_METRICS)
    assert cycle_metrics({"cycle": 4, "eval": None}) == {"cycle": 4}


def test_summarize_reads_every_trial_back(tmp_path):
    sweep, plan = make_sweep(tmp_path)
    summary = summarize(plan)
    assert summary["name"] == "taus" and summary["keys"] == ["distill.tau"]
    assert summary["trials"] == 4
    assert summary["counts"] == {"completed": 1, "running": 1, "failed": 1, "pending": 1}
    t0, t1, t2, t3 = summary["rows"]

    assert t0["trial"] == "t0" and t0["distill.tau"] == 0.8 and t0["status"] == "completed"
    assert t0["cycles"] == 2 and t0["core_size"] == 4 and t0["jaccard"] == 0.5
    assert t0["mean_jaccard"] == 0.5  # cycle 0's None left out
    assert t0["fve"] == 0.80 and t0["core_l0"] == 3.0  # the last cycle
    assert t0["min_fve"] == 0.80 and t0["max_core_l0"] == 3.0  # the worst cycle
    assert t0["seconds"] == 22.0
    assert t0["selected_every_cycle"] == 2  # (0, 1) and (0, 7)
    assert t0["run_dir"] == "trials/t0" and t0["error"] is None

    assert t1["status"] == "running" and t1["selected_every_cycle"] is None
    assert t1["mean_jaccard"] is None and t1["min_fve"] == 0.9
    assert t2["status"] == "failed" and t2["cycles"] == 0 and t2["error"] == "OSError: disk full"
    assert t2["seconds"] is None and t2["min_fve"] is None and t2["core_size"] is None
    assert t3["status"] == "pending" and t3["cycles"] == 0 and t3["run_dir"] == "trials/t3"
    assert list(t0) == list(t3)  # every row has the same columns

    assert summary["cycles"]["t0"] == [
        {"cycle": 0, "core_size": 3, "jaccard": None, "fraction": 0.9},
        {"cycle": 1, "core_size": 4, "jaccard": 0.5, "fraction": 0.9},
    ]
    assert summary["cycles"]["t3"] == []


def test_summarize_adds_tune_errors_only_where_the_run_has_none(tmp_path):
    _, plan = make_sweep(tmp_path)
    errors = {"t0": "late error", "t2": "Tune: trial crashed", "t3": "Tune: could not start"}
    rows = {r["trial"]: r for r in summarize(plan, errors)["rows"]}
    assert rows["t0"]["error"] is None  # completed: not an error
    assert rows["t2"]["error"] == "OSError: disk full"  # the run's own error wins
    assert rows["t3"]["error"] == "Tune: could not start"


def test_a_trial_outside_the_sweep_dir_keeps_its_absolute_path(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    row = trial_row({"name": "x", "params": {}, "run_dir": str(elsewhere)}, [], tmp_path / "s")
    assert row["run_dir"] == str(elsewhere) and row["status"] == "pending"


def test_write_summary_writes_json_csv_and_markdown(tmp_path):
    sweep, plan = make_sweep(tmp_path)
    summary = summarize(plan, {"t3": "bad | pipe"})
    write_summary(sweep, summary)
    assert json.loads((sweep / SUMMARY_JSON).read_text()) == summary

    with (sweep / SUMMARY_CSV).open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trial"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert list(rows[0]) == list(summary["rows"][0])
    assert rows[0]["fve"] == "0.8" and rows[3]["fve"] == ""  # None is an empty cell
    assert rows[3]["error"] == "bad | pipe"

    md = (sweep / SUMMARY_MD).read_text().splitlines()
    assert md[0] == "# Sweep taus"
    assert md[2] == "4 trials: 1 completed, 1 failed, 1 pending, 1 running"
    header = md[4].strip("| ").split(" | ")
    assert "run_dir" not in header and "error" not in header and header[0] == "trial"
    t0 = dict(zip(header, md[6].strip("| ").split(" | "), strict=True))
    assert t0["mean_jaccard"] == "0.5" and t0["distill.tau"] == "0.8"
    assert "- `t2`: OSError: disk full" in md and "- `t3`: bad | pipe" in md
    assert not [p for p in sweep.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_summary_of_a_sweep_without_trials(tmp_path):
    summary = summarize({"name": "empty", "sweep_dir": str(tmp_path), "keys": [], "trials": []})
    write_summary(tmp_path, summary)
    assert (tmp_path / SUMMARY_CSV).read_text() == "trial\n"
    assert "0 trials: " in (tmp_path / SUMMARY_MD).read_text()


def test_markdown_cells_format_floats_and_escape_pipes(tmp_path):
    summary = {
        "name": "fmt", "trials": 1, "counts": {"completed": 1},
        "rows": [{"trial": "a|b", "x": 0.123456789, "y": None, "run_dir": "r", "error": None}],
    }
    write_summary(tmp_path, summary)
    md = (tmp_path / SUMMARY_MD).read_text()
    assert "| a/b | 0.1235 |  |" in md and "Errors:" not in md
