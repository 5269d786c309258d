"""What a REST caller may point a run at: the one validation that distillations and sweeps
share (``Admission.check``), on top of the config schema's own rules.

The service runs jobs on a shared cluster, so a caller does not choose where data comes from:

* ``model.name`` / ``data.dataset``: a hub id (``org/name``), a built-in name, or a path under
  a root the operator configured (``dmsae serve --model-root`` / ``--data-root``);
* ``data.activation_cache``: only under an operator's ``--cache-root`` (a directory or a URI
  prefix);
* ``ray.address``: never (the operator's ``--ray-address``);
* ``distill.init_core``: only a run of this service that has a distilled core (rewritten to
  its run directory);
* ``run_dir``: never (chosen by the server).

A sweep gets the same rules on its base config and on every value its grid (or a ``choice``)
gives one of these keys.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dmsae_ray.config import EMBEDDED_CORPUS, EMBEDDED_MODEL, RunConfig
from dmsae_ray.service import SweepSpec

# The built-in names the model layer resolves itself (lm.resolve_model_path and
# data.resolve_dataset; gemma3_model.GEMMA3_MODEL / GEMMA3_CORPUS, not imported here: the
# service side imports no model layer). tests/test_policy.py checks they agree.
BUILTIN_MODELS = frozenset({EMBEDDED_MODEL, "gemma3-270m"})
BUILTIN_DATASETS = frozenset({EMBEDDED_CORPUS, "gemma3-corpus"})
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)

# Keys whose values come under this policy (dotted, as a sweep names them).
GUARDED = ("model.name", "data.dataset", "data.activation_cache", "ray.address",
           "distill.init_core", "run_dir")

Errors = list[tuple[tuple[str, ...], str]]


class Rejected(ValueError):
    """A request the policy refuses; ``errors`` holds (field path, message) pairs."""

    def __init__(self, errors: Errors) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(loc)}: {msg}" for loc, msg in errors))


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.fullmatch(value)) and ".." not in value


def _roots(paths: Iterable[str | Path]) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in paths)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def path_under(value: str, roots: tuple[Path, ...]) -> bool:
    """``value`` is an absolute path without '..' or '~' inside one of ``roots``; if it exists
    here, where its symlinks lead is inside one of them too."""
    if not roots or not value.startswith("/") or "\x00" in value:
        return False
    if ".." in value.split("/"):
        return False
    path = Path(os.path.normpath(value))
    if not _under(path, roots):
        return False
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError):
        return False
    return _under(real, roots)


@dataclass(frozen=True)
class CacheRoot:
    """An operator's ``--cache-root``: a local directory (also given as ``file://``) or a URI
    prefix such as ``s3://bucket/activations``."""

    scheme: str  # "" for a local directory
    netloc: str
    path: str
    query: str

    @classmethod
    def parse(cls, text: str) -> CacheRoot:
        if "://" not in text or text.startswith("file://"):
            local = unquote(urlsplit(text).path) if text.startswith("file://") else text
            return cls("", "", str(Path(local).expanduser().resolve()), "")
        parts = urlsplit(text)
        path = posixpath.normpath(parts.path or "/")
        return cls(parts.scheme, parts.netloc, path, parts.query)

    def holds(self, value: str) -> bool:
        if self.scheme == "":
            if value.startswith("file://"):
                parts = urlsplit(value)
                if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
                    return False
                value = unquote(parts.path)
            return path_under(value, (Path(self.path),))
        if "://" not in value:
            return False
        parts = urlsplit(value)
        if (parts.scheme, parts.netloc, parts.query) != (self.scheme, self.netloc, self.query):
            return False  # another bucket, host, or endpoint_override
        if parts.fragment or ".." in parts.path.split("/") or "%" in parts.path:
            return False
        path = posixpath.normpath(parts.path or "/")
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


@dataclass
class Admission:
    """The operator's roots, and how ``distill.init_core`` names a run of this service
    (``resolve_core(ref)`` returns that run's directory or raises ``ValueError``)."""

    model_roots: tuple[Path, ...] = ()
    data_roots: tuple[Path, ...] = ()
    cache_roots: tuple[CacheRoot, ...] = ()
    resolve_core: Callable[[str], str] | None = None

    @classmethod
    def from_options(
        cls,
        model_roots: Iterable[str | Path] = (),
        data_roots: Iterable[str | Path] = (),
        cache_roots: Iterable[str] = (),
        resolve_core: Callable[[str], str] | None = None,
    ) -> Admission:
        return cls(
            _roots(model_roots), _roots(data_roots),
            tuple(CacheRoot.parse(str(c)) for c in cache_roots), resolve_core,
        )

    # ------------------------------------------------------------------ one value
    def check_value(self, key: str, value: Any) -> tuple[Any, str | None]:
        """(the value to use, why it is refused or None) for one of the ``GUARDED`` keys."""
        if key == "run_dir":
            return value, "run_dir is chosen by the server; leave it out"
        if value is None:
            return value, None
        if not isinstance(value, str):
            return value, None  # the schema reports the wrong type
        if key == "ray.address":
            return value, ("the Ray cluster is the operator's (dmsae serve --ray-address); "
                           "leave ray.address out")
        if key == "model.name":
            if value in BUILTIN_MODELS or is_hub_id(value) or path_under(value, self.model_roots):
                return value, None
            return value, _source_msg("a model", BUILTIN_MODELS, "--model-root", self.model_roots)
        if key == "data.dataset":
            if value in BUILTIN_DATASETS or is_hub_id(value) or path_under(value,
                                                                          self.data_roots):
                return value, None
            return value, _source_msg("a dataset", BUILTIN_DATASETS, "--data-root",
                                      self.data_roots)
        if key == "data.activation_cache":
            if any(root.holds(value) for root in self.cache_roots):
                return value, None
            where = ", ".join(_cache_text(r) for r in self.cache_roots) or "none configured"
            return value, ("must be a directory or URI under an operator's --cache-root "
                           f"({where})")
        if key == "distill.init_core":
            if self.resolve_core is None:
                return value, "must be the id of a run of this service"
            try:
                return self.resolve_core(value), None
            except ValueError as err:
                return value, str(err)
        return value, None

    # ------------------------------------------------------------------ a request
    def check(
        self, cfg: RunConfig, sweep: SweepSpec | None = None
    ) -> tuple[RunConfig, SweepSpec | None]:
        """Every rule of this module on a run config (a distillation, or a sweep's base) and
        on each value ``sweep`` gives a guarded key. Returns the config and spec to use
        (``distill.init_core`` rewritten to run directories); raises ``Rejected`` naming every
        field that is refused."""
        errors: Errors = []
        data = cfg.model_dump(mode="json", exclude={"sweep"} if sweep is not None else None)
        for key in GUARDED:
            if key == "run_dir":
                if "run_dir" in cfg.model_fields_set:
                    errors.append((("run_dir",), self.check_value(key, None)[1] or ""))
                continue
            section, leaf = key.split(".")
            new, why = self.check_value(key, data[section][leaf])
            if why is not None:
                errors.append(((section, leaf), why))
            data[section][leaf] = new
        if sweep is not None:
            grid = dict(sweep.grid)
            random = dict(sweep.random)
            # run_dir as a swept key is tuning's own error ("chosen by the sweep").
            for key, values in sweep.grid.items():
                if key in GUARDED and key != "run_dir" and isinstance(values, list):
                    grid[key] = self._values(("sweep", "grid", key), key, values, errors)
            for key, dist in sweep.random.items():
                if key not in GUARDED or key == "run_dir":
                    continue
                loc = ("sweep", "random", key)
                if list(dist) != ["choice"] or not isinstance(dist["choice"], list):
                    errors.append((loc, f"{key} may only be varied by a grid or a choice"))
                    continue
                random[key] = {"choice": self._values(loc, key, dist["choice"], errors)}
            sweep = sweep.model_copy(update={"grid": grid, "random": random})
        if errors:
            raise Rejected(errors)
        return RunConfig.model_validate(data), sweep

    def _values(self, loc: tuple[str, ...], key: str, values: list, errors: Errors) -> list:
        out = []
        for v in values:
            new, why = self.check_value(key, v)
            if why is not None:
                errors.append((loc, f"{v!r} is invalid: {key}: {why}"))
            out.append(new)
        return out

    def check_trials(self, configs: Iterable[tuple[str, RunConfig]]) -> None:
        """A planned sweep's trial configs (planning makes relative local paths absolute):
        their model, dataset and cache must still pass."""
        errors: Errors = []
        for name, cfg in configs:
            for key in ("model.name", "data.dataset", "data.activation_cache"):
                section, leaf = key.split(".")
                _, why = self.check_value(key, getattr(getattr(cfg, section), leaf))
                if why is not None:
                    errors.append((("sweep",), f"trial {name}: {key}: {why}"))
        if errors:
            raise Rejected(errors[:20])


def _source_msg(what: str, builtins: frozenset[str], option: str, roots: tuple[Path, ...]) -> str:
    where = ", ".join(str(r) for r in roots) or "none configured"
    return (f"must be {what} hub id (org/name), one of {', '.join(sorted(builtins))}, or an "
            f"absolute path under an operator's {option} ({where})")


def _cache_text(root: CacheRoot) -> str:
    if root.scheme == "":
        return root.path
    return f"{root.scheme}://{root.netloc}{root.path}" + (f"?{root.query}" if root.query else "")
