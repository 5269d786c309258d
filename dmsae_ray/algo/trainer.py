"""One cycle of SAE training in plain PyTorch (docs/algorithm.md section 3, the optimiser).

Ray Train wraps this (``training.py``); nothing here knows about Ray, so the same step and the
same loop (``run_steps``) run in a unit test, in the driver, and in every data-parallel worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.config import SAEConfig, TrainConfig


def lr_lambda(total_steps: int, warmup: int, decay_start: float) -> Callable[[int], float]:
    """Linear warm-up from 0, constant, then linear decay to 0 from ``decay_start`` of the run."""
    decay_at = int(decay_start * total_steps)

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if step >= decay_at and total_steps > decay_at:
            return max(0.0, (total_steps - step) / (total_steps - decay_at))
        return 1.0

    return fn


def num_steps(train: TrainConfig) -> int:
    return max(1, train.tokens_per_cycle // train.batch_size)


class SAELoss(torch.nn.Module):
    """The training loss as a module's forward, so DDP can wrap it."""

    def __init__(self, sae: MatryoshkaBatchTopKSAE, sae_cfg: SAEConfig):
        super().__init__()
        self.sae, self.aux_alpha, self.dead_tokens = sae, sae_cfg.aux_alpha, sae_cfg.dead_tokens

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.sae.loss(x, self.aux_alpha, self.dead_tokens)


class SAETrainer:
    """Adam on every parameter except the frozen core (a buffer), decoder kept unit-norm."""

    def __init__(
        self,
        sae: MatryoshkaBatchTopKSAE,
        sae_cfg: SAEConfig,
        train: TrainConfig,
        loss_module: torch.nn.Module | None = None,
        init_b_dec: bool = True,
    ):
        self.sae, self.sae_cfg, self.train_cfg = sae, sae_cfg, train
        # Under Ray Train this is the DDP-wrapped SAELoss: DDP all-reduces only the gradients
        # of what runs through its own forward().
        # `is None`, not `or`: a wrapped module (DDP, torch.compile) must never be replaced.
        self.loss_module = SAELoss(sae, sae_cfg) if loss_module is None else loss_module
        # Data-parallel callers initialise b_dec once and broadcast it before wrapping in DDP.
        self.init_b_dec = init_b_dec
        self.total_steps = num_steps(train)
        # One fused kernel for the whole update on a GPU; torch's own choice elsewhere.
        self.opt = torch.optim.Adam(
            sae.parameters(), lr=train.lr, betas=tuple(train.betas),
            fused=True if sae.W_enc.is_cuda else None,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.total_steps, train.warmup_steps, train.decay_start)
        )
        self.step_count = 0

    def step(self, x: Tensor) -> dict[str, Tensor]:
        """One optimiser step on a batch of normalised activations."""
        sae = self.sae
        if self.step_count == 0 and self.init_b_dec:
            sae.init_b_dec(x)
        loss, metrics = self.loss_module(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), self.train_cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        sae.normalize_decoder()
        if self.step_count >= self.sae_cfg.threshold_start_step:
            sae.update_threshold(metrics["min_selected"], self.sae_cfg.threshold_beta)
        self.step_count += 1
        metrics["lr"] = torch.tensor(self.sched.get_last_lr()[0])
        return metrics

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step_count = state["step"]


def repeat_batches(batches: Callable[[], Iterable[Tensor]]) -> Iterator[Tensor]:
    """Cycle over a finite activation source: a small corpus is read for several epochs."""
    while True:
        empty = True
        for b in batches():
            empty = False
            yield b
        if empty:
            raise ValueError("the activation source yielded no batches")


class MetricWindow:
    """Running window of the step metrics worth logging.

    Steps keep their metrics as one small tensor on the training device; they reach the host
    only when ``mean`` or ``line`` is asked for (every ``log_every`` steps), so a GPU step
    never waits for a device-to-host copy.
    """

    KEYS = ("loss", "mse", "nested_mse", "l0", "core_l0", "aux_loss", "dead")

    def __init__(self, size: int) -> None:
        self.size = size
        self.steps: list[Tensor] = []

    def add(self, metrics: dict[str, Tensor]) -> None:
        row = torch.stack([torch.as_tensor(metrics[k]).detach().float() for k in self.KEYS])
        # Not steps[-size + 1:]: with size 1 that is steps[0:], every step ever added.
        self.steps = [*self.steps, row][-self.size :]

    def _host(self) -> list[list[float]]:
        return torch.stack(self.steps).cpu().tolist() if self.steps else []

    def mean(self) -> dict[str, float]:
        rows = self._host()
        if not rows:
            return {}
        return {k: sum(r[i] for r in rows) / len(rows) for i, k in enumerate(self.KEYS)}

    def line(self, label: str, step: int, total: int) -> str:
        v = dict(zip(self.KEYS, self._host()[-1], strict=True))
        return (
            f"{label}step {step}/{total} mse {v['mse']:.4f} nested {v['nested_mse']:.4f} "
            f"L0 {v['l0']:.1f} (core {v['core_l0']:.1f}) dead {int(v['dead'])}"
        )


def run_steps(
    trainer: SAETrainer,
    batches: Iterator[Tensor],
    on_interval: Callable[[int, MetricWindow], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """The training loop, the one both backends run: from the step ``trainer`` is at (0, or a
    restored checkpoint's) to ``trainer.total_steps``, one batch of ``batches`` per step.

    ``on_interval(step, window)`` follows every ``train.log_every``-th step and the last one,
    with the window of the last ``log_every`` steps' metrics: the caller logs, reports progress
    or, in a Ray Train worker, reports and checkpoints there. ``before_step(step)`` precedes
    each step; an exception from it stops the loop before that step is taken.

    Returns the last window's mean metrics and ``steps`` (the cycle's total). Resumed at the
    last step, nothing runs and the window is empty: ``{"steps": total}`` only.
    """
    every, total = trainer.train_cfg.log_every, trainer.total_steps
    window = MetricWindow(every)
    for step in range(trainer.step_count + 1, total + 1):
        if before_step is not None:
            before_step(step)
        window.add(trainer.step(next(batches)))
        if on_interval is not None and (step % every == 0 or step == total):
            on_interval(step, window)
    return window.mean() | {"steps": total}


def train_cycle(
    sae: MatryoshkaBatchTopKSAE,
    batches: Iterator[Tensor],
    sae_cfg: SAEConfig,
    train: TrainConfig,
    log: Callable[[str], None] | None = print,
    label: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train for ``train.tokens_per_cycle`` tokens in this process; returns the final-window
    mean metrics and ``steps``."""
    sae.fast = train.fast_path
    trainer = SAETrainer(sae, sae_cfg, train)

    def on_interval(step: int, window: MetricWindow) -> None:
        if progress:
            progress(step * train.batch_size)
        if log:
            log(window.line(label, step, trainer.total_steps))

    return run_steps(trainer, batches, on_interval)


@torch.no_grad()
def estimate_norm_factor(batches: Iterable[Tensor], n_batches: int | None = None) -> float:
    """sqrt(E||x||^2) over the first ``n_batches`` (all: None), so that E||x/norm||^2 = 1
    (dictionary_learning). The sum is exact (``math.fsum`` of per-row squared norms): the same
    rows in any order, in batches of any size, give the same bits."""
    squares: list[float] = []
    for i, x in enumerate(batches):
        if n_batches is not None and i >= n_batches:
            break
        squares.extend(x.double().pow(2).sum(-1).tolist())
    if not squares:
        raise ValueError("no activations to estimate the norm factor from")
    return (math.fsum(squares) / len(squares)) ** 0.5
