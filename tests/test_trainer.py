"""dmsae_ray/algo/trainer.py: the LR schedule, SAETrainer's step and checkpoint, the one step loop
(run_steps: its callbacks, resume and failure semantics), the in-process cycle (its log cadence
and progress), repeat_batches and the norm factor.

(tests/test_sae.py has the schedule's basic shape, MetricWindow and the kept loss module.)
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.algo.trainer import (
    MetricWindow,
    SAETrainer,
    estimate_norm_factor,
    lr_lambda,
    num_steps,
    repeat_batches,
    run_steps,
    train_cycle,
)
from dmsae_ray.config import SAEConfig, TrainConfig

D, WIDTH, K, BATCH = 16, 64, 4, 64


def make_sae(seed=0):
    torch.manual_seed(seed)
    return MatryoshkaBatchTopKSAE(D, WIDTH, K, 0, group_fractions=[0.25, 0.75])


def sae_cfg(**kw):
    return SAEConfig(**{"width": WIDTH, "k": K, "threshold_start_step": 3,
                        "dead_tokens": 10_000} | kw)


def train_cfg(steps, **kw):
    return TrainConfig(**{"tokens_per_cycle": steps * BATCH, "batch_size": BATCH, "lr": 1e-2,
                          "warmup_steps": 2, "log_every": 5, "checkpoint_every": 5} | kw)


def sparse_batches(seed=1):
    """Endless batches with a sparse linear structure an SAE can learn."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(40, D, generator=gen)
    while True:
        codes = torch.relu(torch.randn(BATCH, 40, generator=gen) - 1.0)
        yield codes @ mix


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_edge_cases():
    no_warmup = lr_lambda(10, 0, 0.5)
    assert no_warmup(0) == 1.0 and no_warmup(4) == 1.0
    assert [no_warmup(s) for s in (5, 6, 9, 10)] == [1.0, 0.8, 0.2, 0.0]
    never_decays = lr_lambda(10, 2, 1.0)  # decay_start 1: decay_at == total_steps
    assert [never_decays(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    tiny = lr_lambda(1, 0, 0.8)  # decay_at rounds down to 0: decays from the only step
    assert tiny(0) == 1.0 and tiny(1) == 0.0
    assert all(lr_lambda(50, 5, 0.8)(s) >= 0.0 for s in range(60))  # never negative


def test_num_steps_is_whole_batches_and_at_least_one():
    assert num_steps(TrainConfig(tokens_per_cycle=1000, batch_size=64)) == 15
    assert num_steps(TrainConfig(tokens_per_cycle=10, batch_size=64)) == 1


# ----------------------------------------------------------------------------- the step


def test_step_keeps_the_decoder_unit_norm_and_starts_the_threshold_on_time():
    sae = make_sae()
    trainer = SAETrainer(sae, sae_cfg(threshold_start_step=3), train_cfg(20, warmup_steps=4))
    batches = sparse_batches()
    lrs = []
    for step in range(5):
        m = trainer.step(next(batches))
        lrs.append(float(m["lr"]))
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
        if step < 3:
            assert float(sae.threshold) == -1.0  # not before threshold_start_step
    assert float(sae.threshold) > 0
    assert trainer.step_count == 5
    # The lr reported is the one for the next step: warm-up 2/4, 3/4, then full.
    assert lrs == pytest.approx([5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


@pytest.mark.parametrize("init, expected", [(True, [BATCH]), (False, [])])
def test_b_dec_is_initialised_on_the_first_step_only_when_asked(init, expected):
    sae = make_sae()
    calls = []
    real = sae.init_b_dec
    sae.init_b_dec = lambda x: (calls.append(len(x)), real(x))
    trainer = SAETrainer(sae, sae_cfg(), train_cfg(10), init_b_dec=init)
    batches = sparse_batches()
    for _ in range(3):
        trainer.step(next(batches))
    assert calls == expected


def test_a_restored_trainer_continues_bit_identically():
    batches = list(itertools.islice(sparse_batches(), 8))
    a = SAETrainer(make_sae(), sae_cfg(), train_cfg(8))
    for x in batches[:5]:
        a.step(x)
    saved = copy.deepcopy(a.state_dict())
    for x in batches[5:]:
        a.step(x)

    b = SAETrainer(make_sae(seed=123), sae_cfg(), train_cfg(8))  # other initial weights
    b.load_state_dict(saved)
    assert b.step_count == 5
    for x in batches[5:]:
        b.step(x)  # b_dec is not re-initialised after a restore (step_count > 0)
    for (name, va), vb in zip(a.sae.state_dict().items(), b.sae.state_dict().values(),
                              strict=True):
        assert torch.equal(va, vb), name
    assert a.sched.get_last_lr() == b.sched.get_last_lr()


# ----------------------------------------------------------------------------- the loop


def counted(source, consumed: list[int]):
    for x in source:
        consumed.append(1)
        yield x


def test_run_steps_calls_back_every_log_every_steps_and_at_the_last():
    trainer = SAETrainer(make_sae(), sae_cfg(), train_cfg(11, log_every=4, checkpoint_every=4))
    before: list[int] = []
    seen: list[tuple[int, int]] = []
    windows: list[MetricWindow] = []

    def before_step(step: int) -> None:
        assert trainer.step_count == step - 1  # before the step is taken
        before.append(step)

    def on_interval(step: int, window: MetricWindow) -> None:
        assert trainer.step_count == step  # after it
        seen.append((step, len(window.steps)))
        windows.append(window)

    consumed: list[int] = []
    out = run_steps(trainer, counted(sparse_batches(), consumed), on_interval, before_step)
    assert before == list(range(1, 12)) and len(consumed) == 11
    assert seen == [(4, 4), (8, 4), (11, 4)]  # the last step too, though not a multiple
    assert set(out) == set(MetricWindow.KEYS) | {"steps"} and out["steps"] == 11
    assert out == windows[-1].mean() | {"steps": 11}  # the window the last callback saw


def test_run_steps_adds_nothing_to_the_steps():
    """The loop is SAETrainer.step once per batch, nothing else: bit for bit the same SAE."""
    batches = list(itertools.islice(sparse_batches(), 9))
    looped = SAETrainer(make_sae(), sae_cfg(), train_cfg(9))
    run_steps(looped, iter(batches), lambda step, window: window.line("", step, 9))
    by_hand = SAETrainer(make_sae(), sae_cfg(), train_cfg(9))
    for x in batches:
        by_hand.step(x)
    for (name, a), b in zip(looped.sae.state_dict().items(), by_hand.sae.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_run_steps_stops_before_a_failing_step_and_resumes_where_the_trainer_is():
    """The Ray worker's cases: a failure injected before step 6 takes no batch for it, and a
    trainer restored at step 5 runs steps 6-11 on the next batches, calling back at 8 and 11,
    and ends where an uninterrupted run does, bit for bit."""
    batches = list(itertools.islice(sparse_batches(), 11))
    cfg = train_cfg(11, log_every=4, checkpoint_every=4)
    whole = SAETrainer(make_sae(), sae_cfg(), cfg)
    uninterrupted = run_steps(whole, iter(batches))

    failed = SAETrainer(make_sae(), sae_cfg(), cfg)

    def fail_at_6(step: int) -> None:
        if step == 6:
            raise RuntimeError(f"injected at {step}")

    consumed: list[int] = []
    with pytest.raises(RuntimeError, match="injected at 6"):
        run_steps(failed, counted(iter(batches), consumed), before_step=fail_at_6)
    assert failed.step_count == 5 and len(consumed) == 5
    saved = copy.deepcopy(failed.state_dict())

    resumed = SAETrainer(make_sae(seed=7), sae_cfg(), cfg)
    resumed.load_state_dict(saved)
    steps: list[int] = []
    out = run_steps(resumed, iter(batches[5:]), lambda step, window: steps.append(step))
    assert steps == [8, 11]
    assert out == uninterrupted  # the same last window: steps 8-11 in both
    for (name, a), b in zip(whole.sae.state_dict().items(), resumed.sae.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_run_steps_resumed_at_the_last_step_runs_nothing():
    """A checkpoint of the finished cycle: no step, no callback, no batch, an empty window."""
    cfg = train_cfg(3, log_every=1)
    done = SAETrainer(make_sae(), sae_cfg(), cfg)
    run_steps(done, sparse_batches())
    again = SAETrainer(make_sae(), sae_cfg(), cfg)
    again.load_state_dict(copy.deepcopy(done.state_dict()))
    calls: list[int] = []
    out = run_steps(again, iter([]), lambda step, window: calls.append(step), calls.append)
    assert out == {"steps": 3} and calls == [] and again.step_count == 3


# ----------------------------------------------------------------------------- the cycle


def test_train_cycle_reduces_the_loss_and_reports_the_last_window():
    sae = make_sae()
    lines: list[str] = []
    out = train_cycle(sae, sparse_batches(), sae_cfg(), train_cfg(40), log=lines.append,
                      label="[cycle 0] ")
    assert len(lines) == 8 and all(line.startswith("[cycle 0] step ") for line in lines)
    mse = [float(re.search(r" mse ([\d.]+)", line).group(1)) for line in lines]
    assert mse[-1] < 0.5 * mse[0], mse
    assert set(out) == set(MetricWindow.KEYS) | {"steps"} and out["steps"] == 40
    assert out["mse"] < mse[0]
    assert abs(out["l0"] - K) < 1.0


def test_train_cycle_logs_every_log_every_steps_and_at_the_end():
    sae = make_sae()
    lines: list[str] = []
    tokens: list[int] = []
    cfg = train_cfg(11, log_every=4, checkpoint_every=4)
    train_cycle(sae, sparse_batches(), sae_cfg(), cfg, log=lines.append, progress=tokens.append)
    assert [line.split(" mse")[0] for line in lines] == ["step 4/11", "step 8/11", "step 11/11"]
    assert tokens == [4 * BATCH, 8 * BATCH, 11 * BATCH]


def test_train_cycle_without_a_log_and_on_the_dense_path():
    sae = make_sae()
    consumed = []

    def counted():
        for x in sparse_batches():
            consumed.append(1)
            yield x

    out = train_cycle(sae, counted(), sae_cfg(), train_cfg(6, fast_path=False), log=None)
    assert sae.fast is False  # train.fast_path decides how the loss is computed
    assert out["steps"] == 6 and len(consumed) == 6  # one batch per step, no more


# ----------------------------------------------------------------------------- sources


def test_repeat_batches_reads_a_finite_source_again_and_refuses_an_empty_one():
    passes = []

    def source():
        passes.append(1)
        return iter([torch.tensor([1.0]), torch.tensor([2.0])])

    got = [float(b) for b in itertools.islice(repeat_batches(source), 5)]
    assert got == [1.0, 2.0, 1.0, 2.0, 1.0] and len(passes) == 3
    with pytest.raises(ValueError, match="yielded no batches"):
        next(repeat_batches(lambda: iter([])))


def test_norm_factor_makes_the_mean_squared_norm_one():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * 7 + 2
    n = estimate_norm_factor([x[:100], x[100:]])
    assert float((x.double() / n).pow(2).sum(-1).mean()) == pytest.approx(1.0, abs=1e-9)
    assert estimate_norm_factor([torch.full((4, 4), 0.5)]) == 1.0  # ||x||^2 = 1 per row
    with pytest.raises(ValueError, match="no activations"):
        estimate_norm_factor([])
    with pytest.raises(ValueError, match="no activations"):
        estimate_norm_factor([x], n_batches=0)


def test_metric_window_takes_plain_numbers_and_labels_its_line():
    window = MetricWindow(size=3)
    window.add({k: i for i, k in enumerate(MetricWindow.KEYS)})  # ints and floats work too
    window.add({k: float(i) + 1 for i, k in enumerate(MetricWindow.KEYS)})
    assert window.mean()["loss"] == 0.5 and window.mean()["dead"] == 6.5
    line = window.line("[x] ", 2, 10)
    assert line == "[x] step 2/10 mse 2.0000 nested 3.0000 L0 4.0 (core 5.0) dead 7"


@pytest.mark.parametrize("size", [1, 2, 5])
def test_metric_window_keeps_exactly_the_last_size_steps(size):
    """log_every: 1 is allowed; a window of one step must not grow into the whole cycle."""
    window = MetricWindow(size)
    for step in range(12):
        window.add({k: float(step) for k in MetricWindow.KEYS})
        assert len(window.steps) == min(step + 1, size)
    last = list(range(12))[-size:]
    assert window.mean()["mse"] == sum(last) / size


def test_train_cycle_with_log_every_one_returns_the_last_step():
    sae = make_sae()
    lines: list[str] = []
    out = train_cycle(sae, sparse_batches(), sae_cfg(), train_cfg(6, log_every=1),
                      log=lines.append)
    assert len(lines) == 6
    last_mse = float(re.search(r" mse ([\d.]+)", lines[-1]).group(1))
    assert out["mse"] == pytest.approx(last_mse, abs=1e-4)  # the line rounds to 4 places
