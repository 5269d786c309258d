"""runfiles.CycleSummary: a committed cycle's summary, typed, read back exactly as written."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from shared_runs import finished_core_run

from dmsae_ray.run.runfiles import CycleSummary, new_state, read_cycles, read_state

# state.json's "cycles" of a two-cycle tiny run, written by the pipeline before CycleSummary
# existed (a plain dict per cycle): the format every reader must keep reading and writing.
WRITTEN = [{'cycle': 0,
      'core_in': 0,
      'core_size': 5,
      'jaccard': None,
      'fraction': 0.9272773529329049,
      'train': {'loss': 0.09262786898761988,
                'mse': 0.312548391520977,
                'nested_mse': 0.5916747376322746,
                'l0': 8.0,
                'core_l0': 0.0,
                'aux_loss': 0.0,
                'dead': 0.0,
                'steps': 16},
      'eval': {'l0': 4.92,
               'core_l0': 0.0,
               'l1': 15.208096122244932,
               'mse': 103.4710097124466,
               'fve': 0.23051425191403563,
               'explained_variance': 0.564993389645436,
               'explained_variance_legacy': 0.1392951110795725,
               'cossim': 0.7693921112756958,
               'l2_norm_in': 15.887192146467882,
               'l2_norm_out': 12.254957057287575,
               'l2_ratio': 0.7740490610300775,
               'relative_reconstruction_bias': 1.0106706089493283,
               'nested_mse': 153.8054757912192,
               'nested_fve': -0.14380947791879373,
               'frac_alive': 0.578125,
               'freq_over_1_percent': 0.28125,
               'freq_over_10_percent': 0.0546875,
               'normalized_freq_over_1_percent': 0.9113821101390776,
               'normalized_freq_over_10_percent': 0.5626016240269887,
               'feature_density_hist': {'log10_edges': [-10.0, -9.5, -9.0, -8.5, -8.0, -7.5, -7.0,
                                                        -6.5, -6.0, -5.5, -5.0, -4.5, -4.0, -3.5,
                                                        -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0],
                                        'counts': [108, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                   76, 38, 20, 13, 1]},
               'ce_clean': 5.7022952184020745,
               'ce_sae': 5.684145784571103,
               'ce_zero': 5.7037823016826925,
               'kl_sae': 0.00724306869506836,
               'kl_zero': 0.013092449188232422,
               'average_max_encoder_cosine_sim': 0.3432544469833374,
               'average_max_decoder_cosine_sim': 0.33659687638282776,
               'l0_overflow': 0.0,
               'ce_loss_score': 13.204719175801067,
               'kl_div_score': 0.44677511511150436,
               'eval_tokens': 250,
               'norm_factor': 16.226323634643233},
      'seconds': 0.40399885177612305},
     {'cycle': 1,
      'core_in': 5,
      'core_size': 9,
      'jaccard': 0.4,
      'fraction': 0.9593803040658717,
      'train': {'loss': 0.0950182443484664,
                'mse': 0.3242705725133419,
                'nested_mse': 0.5989115163683891,
                'l0': 8.0,
                'core_l0': 1.5673828125,
                'aux_loss': 0.0,
                'dead': 0.0,
                'steps': 16},
      'eval': {'l0': 5.76,
               'core_l0': 1.82,
               'l1': 15.973343851815725,
               'mse': 103.35333252726385,
               'fve': 0.23138938512404927,
               'explained_variance': 0.565488121006275,
               'explained_variance_legacy': 0.1151691350592479,
               'cossim': 0.7633423192691977,
               'l2_norm_in': 15.887192146467882,
               'l2_norm_out': 12.13891601720404,
               'l2_ratio': 0.7644729598540263,
               'relative_reconstruction_bias': 0.9994696218946695,
               'nested_mse': 156.51916748231068,
               'nested_fve': -0.1639904647169057,
               'frac_alive': 0.45703125,
               'freq_over_1_percent': 0.26953125,
               'freq_over_10_percent': 0.05859375,
               'normalized_freq_over_1_percent': 0.9583333311101241,
               'normalized_freq_over_10_percent': 0.6159722155559628,
               'feature_density_hist': {'log10_edges': [-10.0, -9.5, -9.0, -8.5, -8.0, -7.5, -7.0,
                                                        -6.5, -6.0, -5.5, -5.0, -4.5, -4.0, -3.5,
                                                        -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0],
                                        'counts': [139, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                   48, 29, 25, 12, 3]},
               'core_frac_alive': 1.0,
               'ce_clean': 5.7022952184020745,
               'ce_sae': 5.693310942244433,
               'ce_zero': 5.7037823016826925,
               'kl_sae': 0.008148441314697266,
               'kl_zero': 0.013092449188232422,
               'average_max_encoder_cosine_sim': 0.3444785177707672,
               'average_max_decoder_cosine_sim': 0.33302855491638184,
               'l0_overflow': 0.0,
               'ce_loss_score': 7.04154204054262,
               'kl_div_score': 0.37762284217828873,
               'eval_tokens': 250,
               'norm_factor': 16.226323634643233},
      'seconds': 0.4679253101348877}]
KEYS = ["cycle", "core_in", "core_size", "jaccard", "fraction", "train", "eval", "seconds"]


@pytest.mark.parametrize("written", WRITTEN, ids=["cycle0", "cycle1"])
def test_a_written_summary_round_trips_to_the_same_dict_and_json(written):
    s = CycleSummary.from_dict(written)
    assert s.to_dict() == written
    assert list(s.to_dict()) == KEYS  # the order too, so state.json keeps its bytes
    assert json.dumps(s.to_dict(), indent=2) == json.dumps(written, indent=2)
    assert (s.cycle, s.core_in, s.core_size) == (
        written["cycle"], written["core_in"], written["core_size"]
    )
    assert s.jaccard == written["jaccard"] and s.fraction == written["fraction"]
    assert s.seconds == written["seconds"] and s.eval["fve"] == written["eval"]["fve"]
    assert s.train["steps"] == 16


def test_metrics_json_is_the_summary_without_seconds():
    written = {k: v for k, v in WRITTEN[1].items() if k != "seconds"}
    s = CycleSummary.from_dict(written)
    assert s.seconds is None
    assert s.to_dict() == written and "seconds" not in s.to_dict()
    assert dataclasses.replace(s, seconds=WRITTEN[1]["seconds"]).to_dict() == WRITTEN[1]


def test_a_summary_built_as_the_pipeline_builds_it_writes_todays_dict():
    w = WRITTEN[1]
    built = CycleSummary(
        cycle=w["cycle"], core_in=w["core_in"], core_size=w["core_size"], jaccard=w["jaccard"],
        fraction=w["fraction"], train=w["train"], eval=w["eval"],
    )
    assert list(built.to_dict()) == KEYS[:-1]  # no seconds until the commit
    committed = dataclasses.replace(built, seconds=w["seconds"])
    assert committed.to_dict() == w and list(committed.to_dict()) == KEYS
    assert committed == CycleSummary.from_dict(w)


def test_an_old_summary_missing_keys_reads_with_defaults_and_writes_back_unchanged():
    # Before fve, nested_fve and l0_overflow were evaluated; the same key set at the top.
    old = {"cycle": 0, "core_in": 0, "core_size": 3, "jaccard": None, "fraction": 0.91,
           "train": {"loss": 0.1, "steps": 8}, "eval": {"l0": 4.0, "explained_variance": 0.5},
           "seconds": 1.5}
    s = CycleSummary.from_dict(old)
    assert s.eval.get("fve") is None and s.eval.get("l0_overflow", 0.0) == 0.0
    assert s.to_dict() == old
    # A partial summary (the API passes what the file holds, not defaults filled in).
    partial = {"cycle": 1, "core_size": 1}
    s = CycleSummary.from_dict(partial)
    assert (s.core_in, s.jaccard, s.fraction, s.seconds) == (None, None, None, None)
    assert s.train == {} and s.eval == {}
    assert s.to_dict() == partial


def test_unknown_keys_survive_and_a_summary_needs_its_cycle():
    newer = WRITTEN[0] | {"added_later": {"x": 1}}
    s = CycleSummary.from_dict(newer)
    assert s.extra == {"added_later": {"x": 1}}
    assert s.to_dict() == newer and list(s.to_dict()) == [*KEYS, "added_later"]
    with pytest.raises(ValueError, match="without 'cycle'"):
        CycleSummary.from_dict({"core_size": 3})


def test_a_summary_is_frozen_and_to_dict_hands_out_copies():
    s = CycleSummary.from_dict(WRITTEN[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cycle = 5  # type: ignore[misc]
    out = s.to_dict()
    out["eval"]["extra_metric"] = 1.0
    out["train"].clear()
    assert "extra_metric" not in s.eval and s.train["steps"] == 16
    assert s.to_dict() == WRITTEN[0]


def test_read_cycles_of_a_state():
    assert read_cycles({"cycles": WRITTEN}) == [CycleSummary.from_dict(w) for w in WRITTEN]
    assert [c.cycle for c in read_cycles({"cycles": WRITTEN})] == [0, 1]
    assert read_cycles(new_state()) == read_cycles({}) == read_cycles(None) == []


def test_runfiles_imports_no_torch():
    # dmsae status and the service read cycles through it; torch would cost seconds.
    code = ("import sys, dmsae_ray.run.runfiles; "
            "print(sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_pipeline_run_s_files_read_back_byte_for_byte(tiny_dir, tmp_path_factory):
    run_dir = finished_core_run(tiny_dir, tmp_path_factory)
    state = read_state(run_dir)
    cycles = read_cycles(state)
    assert [c.cycle for c in cycles] == [0, 1, 2] and cycles[0].jaccard is None
    assert all(c.seconds is not None and c.seconds > 0 for c in cycles)
    text = (run_dir / "state.json").read_text()
    rewritten = state | {"cycles": [c.to_dict() for c in cycles]}
    assert json.dumps(rewritten, indent=2) + "\n" == text
    for c in cycles:
        path = run_dir / "cycles" / f"{c.cycle:03d}" / "sae" / "metrics.json"
        saved = CycleSummary.from_dict(json.loads(path.read_text()))
        assert json.dumps(saved.to_dict(), indent=2) + "\n" == path.read_text()
        assert saved == dataclasses.replace(c, seconds=None)
