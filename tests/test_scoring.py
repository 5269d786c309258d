"""dmsae_ray/distributed/scoring.py on the session's real Ray cluster: the scoring actors give the
same bits as the in-process attribution and evaluation, however the blocks are split across actors
and the candidates across latent chunks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import ray
import torch
from conftest import tiny_config
from torch import Tensor, nn

from dmsae_ray.algo.attribution import attribute, pool, scored_mask, token_scores
from dmsae_ray.algo.evaluate import evaluate_sae
from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import RunConfig, validate
from dmsae_ray.distributed.scoring import ScoringPool, latent_chunks
from dmsae_ray.model.data import load_token_data, valid_mask
from dmsae_ray.model.lm import layer_activations, load_lm, load_tokenizer


@dataclass
class Setup:
    cfg: RunConfig
    model: nn.Module  # loaded by load_lm from cfg.model, exactly as each actor loads it
    sae: MatryoshkaBatchTopKSAE
    attribution: Tensor
    eval: Tensor
    specials: list[int]
    norm_factor: float


@pytest.fixture(scope="module")
def setup(ray_head, tiny_dir, tmp_path_factory) -> Setup:
    run_dir = tmp_path_factory.mktemp("scoring") / "run"
    # batch_size 3 over 8 blocks: batches of 3, 3, 2 in one process but 3, 1 per actor of
    # two, so the comparison also covers batch boundaries that differ between the paths.
    cfg = validate(
        tiny_config(tiny_dir, run_dir, ray={"enabled": True}, attribution={"batch_size": 3})
    )
    model = load_lm(cfg.model)
    data = load_token_data(cfg.data, load_tokenizer(cfg.model))
    torch.manual_seed(0)
    d = model.config.hidden_size
    sae = MatryoshkaBatchTopKSAE(d, 128, 8, core_size=3, group_fractions=[0.25, 0.75])
    sae.set_core(
        torch.randn(d, 3) * 0.3, torch.zeros(3, dtype=torch.long), torch.arange(3), tied=False
    )
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # a random SAE that fires: the scores are not all zero
    sae.threshold.fill_(0.02)
    sae.eval()  # as ScoringActor.load_sae leaves it
    h = layer_activations(model, data.attribution, cfg.model.layer)
    norm_factor = float(h.pow(2).sum(-1).mean().sqrt())
    return Setup(cfg, model, sae, data.attribution, data.eval, data.specials, norm_factor)


def _make_pool(setup: Setup, actors: int) -> ScoringPool:
    ray_cfg = setup.cfg.ray.model_copy(update={"activation_actors": actors})
    return ScoringPool(setup.cfg.model_copy(update={"ray": ray_cfg}), setup.specials, setup.sae)


@pytest.fixture(scope="module")
def pool2(setup) -> Iterator[ScoringPool]:
    # One pool of two actors for the whole module (each pool costs an LM load per actor):
    # it covers split blocks, an empty shard (fewer blocks than actors) and every chunking.
    # test_close_kills_the_actors, the module's last test, closes it; closing twice is harmless.
    pool = _make_pool(setup, 2)
    yield pool
    pool.close()


def _in_process(setup: Setup, cfg: RunConfig | None = None) -> Tensor:
    cfg = cfg or setup.cfg
    return attribute(
        setup.model, setup.sae, setup.attribution, cfg.model.layer, setup.norm_factor,
        setup.specials, cfg.attribution, log=None,
    )


def _ray(pool: ScoringPool, setup: Setup, chunk: int) -> Tensor:
    return pool.attribute(setup.attribution, setup.norm_factor, chunk=chunk)


def test_latent_chunks_cover_every_column_once():
    assert latent_chunks(34, 34) == [(0, 34)]
    assert latent_chunks(34, 512) == [(0, 34)]  # n < chunk: one short chunk
    assert latent_chunks(34, 17) == [(0, 17), (17, 34)]
    assert latent_chunks(34, 8) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 34)]
    assert latent_chunks(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert latent_chunks(0, 4) == []
    for n, chunk in ((1, 1), (7, 3), (100, 7), (512, 512), (513, 512)):
        chunks = latent_chunks(n, chunk)
        cols = [c for a, b in chunks for c in range(a, b)]
        assert cols == list(range(n))
        assert all(0 < b - a <= chunk for a, b in chunks)
        assert len(chunks) == -(-n // chunk)


def test_token_scores_are_what_attribute_pools(setup):
    acfg = setup.cfg.attribution
    lines: list[str] = []
    scores = token_scores(
        setup.model, setup.sae, setup.attribution, setup.cfg.model.layer, setup.norm_factor,
        setup.specials, acfg,
    )
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert scores.shape[1] == setup.sae.nested_width == 34
    # one row per position with a valid next-token target, in block order
    scored = scored_mask(valid_mask(setup.attribution, setup.specials))
    assert scores.shape[0] == int(scored.sum()) > 0
    assert (scores >= 0).all() and scores.sum() > 0  # sign "abs"
    pooled = attribute(
        setup.model, setup.sae, setup.attribution, setup.cfg.model.layer, setup.norm_factor,
        setup.specials, acfg, log=lines.append,
    )
    assert torch.equal(pooled, pool(scores, acfg))
    torch.testing.assert_close(pooled, torch.quantile(scores, acfg.quantile, dim=0))
    # one progress line per batch of blocks, the last one counting every block
    assert lines == [f"attribution {i}/8 sequences" for i in (3, 6, 8)]


@pytest.mark.parametrize("chunk", [512, 34, 17, 8], ids=["n<chunk", "n=chunk", "2", "5-uneven"])
def test_two_actors_attribution_equals_in_process(setup, pool2, chunk):
    assert len(pool2.actors) == 2
    got = _ray(pool2, setup, chunk)
    assert got.shape == (setup.sae.nested_width,) and got.dtype == torch.float32
    assert torch.equal(got, _in_process(setup))
    assert got.sum() > 0


def test_two_actors_with_fewer_blocks_than_actors(setup, pool2):
    # one block: the second actor's shard is empty and is not asked
    one = setup.attribution[:1]
    expected = attribute(
        setup.model, setup.sae, one, setup.cfg.model.layer, setup.norm_factor, setup.specials,
        setup.cfg.attribution, log=None,
    )
    assert torch.equal(pool2.attribute(one, setup.norm_factor, chunk=17), expected)


def test_other_attribution_settings_reach_the_actors(setup, pool2):
    # The pool reads cfg.attribution at every call: one pool scores several settings.
    variant = setup.cfg.attribution.model_copy(
        update={"mode": "error_term", "sign": "helpful_only", "pooling": "mean", "batch_size": 2}
    )
    cfg = setup.cfg.model_copy(update={"attribution": variant})
    default = pool2.attribute(setup.attribution, setup.norm_factor, chunk=512)
    pool2.cfg = cfg
    try:
        one = pool2.attribute(setup.attribution, setup.norm_factor, chunk=512)
        several = pool2.attribute(setup.attribution, setup.norm_factor, chunk=8)
    finally:
        pool2.cfg = setup.cfg
    assert torch.equal(one, _in_process(setup, cfg))
    assert not torch.equal(one, default)
    assert (one >= 0).all() and one.sum() > 0
    # Mean pooling reduces each column on its own, so a chunk's reducer gives the in-process
    # bits exactly (a vectorised mean(0) over a chunk used to differ in the last bit).
    assert torch.equal(several, one)


def test_evaluate_equals_in_process(setup, pool2):
    got = pool2.evaluate(setup.eval, setup.norm_factor)
    expected = evaluate_sae(
        setup.model, setup.sae, setup.eval, setup.cfg.model.layer, setup.norm_factor,
        setup.specials, setup.cfg.data.llm_batch_size,
    )
    assert set(got) == set(expected) and "fve" in got
    assert len(got["candidate_density"]) == setup.sae.nested_width
    assert got == expected


def test_close_kills_the_actors(pool2):
    actors = list(pool2.actors)
    assert ray.get([a.__ray_ready__.remote() for a in actors], timeout=120)
    pool2.close()
    # ray.kill returns before the process is gone: a call made at once may still be answered.
    # A killed actor (no restarts) must then fail every call, never come back.
    for actor in actors:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("a scoring actor still answers after close()")
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=60)
