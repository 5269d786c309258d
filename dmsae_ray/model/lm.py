"""Causal LM loading and the residual-stream hook at decoder layer L.

The hook site is the output of ``model.model.layers[L]`` (TransformerLens
``blocks.L.hook_resid_post``), which equals ``hidden_states[L + 1]`` of a full forward for every
L below the last layer. Newer transformers return a bare tensor from a decoder layer, older ones
a tuple; both are handled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dmsae_ray.config import EMBEDDED_MODEL, MissingInputError, ModelConfig
from dmsae_ray.model.gemma3_model import GEMMA3_MODEL, fetch_gemma3


class StopForward(Exception):
    """Raised inside the hook so the LM never computes the layers after L."""


def resolve_model_path(name: str) -> str:
    """'stories15m' / 'gemma3-270m' -> the converted cache dir; else a hub id or local dir."""
    if name == EMBEDDED_MODEL:
        from dmsae_ray.model.default_model import fetch_stories15m

        return str(fetch_stories15m())
    if name == GEMMA3_MODEL:
        return str(fetch_gemma3())
    return name


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def text_config_of(cfg: ModelConfig):
    """Read only the model's config: checks the layer index before any weights load."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name)
    try:
        mcfg = AutoConfig.from_pretrained(path, revision=cfg.revision)
    except OSError as err:
        raise MissingInputError(
            f"model.name: cannot load {cfg.name!r} (not a local model directory, and the hub "
            f"is unreachable or has no such model): {err}"
        ) from None
    return getattr(mcfg, "text_config", None) or mcfg


def num_layers_of(cfg: ModelConfig) -> int:
    return int(text_config_of(cfg).num_hidden_layers)


def hidden_size_of(cfg: ModelConfig) -> int:
    return int(text_config_of(cfg).hidden_size)


def load_lm(cfg: ModelConfig, device: torch.device | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        # A bar redrawn into a log (every Ray actor's, `ray job logs`) is one long line of \r.
        hf_logging.disable_progress_bar()
    device = device or default_device()
    kwargs: dict = {"dtype": pick_dtype(cfg.dtype, device), "revision": cfg.revision}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.name), **kwargs)
    except OSError as err:
        raise MissingInputError(f"model.name: cannot load {cfg.name!r}: {err}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(cfg.name), revision=cfg.revision)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:  # multimodal wrappers keep the text model one level deeper
        layers = inner.language_model.layers
    return layers


def _unwrap(out: Tensor | tuple) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _rewrap(out: Tensor | tuple, new: Tensor) -> Tensor | tuple:
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def replace_layer_output(
    model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]
) -> Iterator[None]:
    """Replace the output of decoder layer ``layer`` with ``fn(output)`` while in the block."""

    def hook(_mod: nn.Module, _inp: tuple, out: Tensor | tuple) -> Tensor | tuple:
        return _rewrap(out, fn(_unwrap(out)))

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_activations(
    model: nn.Module, input_ids: Tensor, layer: int, attention_mask: Tensor | None = None
) -> Tensor:
    """Output of decoder layer ``layer`` [B, T, d], stopping the forward right after it."""
    box: dict[str, Tensor] = {}

    def hook(_mod: nn.Module, _inp: tuple, out: Tensor | tuple) -> None:
        box["h"] = _unwrap(out)
        raise StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return box["h"]


@torch.no_grad()
def layer_activations_full(
    model: nn.Module, input_ids: Tensor, layer: int, attention_mask: Tensor | None = None
) -> Tensor:
    """Reference path: a full forward with ``output_hidden_states`` (slower, same values)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[layer + 1]
