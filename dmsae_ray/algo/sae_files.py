"""The SAE on disk: the one format of a trained SAE, wherever it is written.

A run directory's ``cycles/NNN/sae/`` (``rundir.py``) and the SAE a Ray Train worker hands to
the driver in ``ray_train/cycle-NNN/final/`` (``training.py``) are both this format, so one
reader rebuilds either:

- ``dmsae_state.safetensors``: the full state (frozen core, persistent latent ids, threshold,
  firing counters) in the normalised scale the SAE was trained in;
- ``dmsae_hparams.json``: its shape (``MatryoshkaBatchTopKSAE.hparams``);
- ``metrics.json`` (optional): what the writer knows about it (the cycle summary in a run
  directory, the training metrics from a worker).

``sae.py`` stays free of file layout; this module is torch, safetensors and ``jsonio`` only.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from dmsae_ray.algo.sae import MatryoshkaBatchTopKSAE
from dmsae_ray.jsonio import atomic_directory, atomic_write_json, read_json

STATE_FILE = "dmsae_state.safetensors"
HPARAMS_FILE = "dmsae_hparams.json"
METRICS_FILE = "metrics.json"


def save_sae(
    directory: str | Path, sae: MatryoshkaBatchTopKSAE, metrics: dict | None = None
) -> None:
    """Write ``directory`` as a whole: built under a hidden temporary name beside it and renamed
    into place, so a reader (the driver after a worker, a resumed run) finds either the old
    directory or the complete new one. An existing ``directory`` is replaced."""
    with atomic_directory(directory) as tmp:
        # detach/cpu: a worker's SAE may live on a GPU; contiguous: safetensors requires it.
        state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
        save_file(state, str(tmp / STATE_FILE))
        atomic_write_json(tmp / HPARAMS_FILE, sae.hparams())
        if metrics is not None:
            atomic_write_json(tmp / METRICS_FILE, metrics)


def load_sae(directory: str | Path) -> tuple[MatryoshkaBatchTopKSAE, dict | None]:
    """The SAE ``save_sae`` wrote (in training mode, as ``from_state`` builds it) and its
    metrics, None when it was saved without."""
    d = Path(directory)
    sae = MatryoshkaBatchTopKSAE.from_state(
        read_json(d / HPARAMS_FILE), load_file(str(d / STATE_FILE))
    )
    metrics_path = d / METRICS_FILE
    return sae, read_json(metrics_path) if metrics_path.is_file() else None
