"""``ertacache.sample(model, noise, cond, ..., target_speedup=2.0)``: the core sampler's one line.

Without a policy and with a ``target_speedup``, the first call of each setting calibrates (the default
configuration, :func:`~ertacache.calibration.calibrate`) on the call's own conditions (its rows; noise seeds
``0..B-1``) and samples with the new policy; later calls with the same setting reuse it. A setting is the model
(its fingerprint, for an ``nn.Module``), the step count, shift, guidance scale and whether a null condition is
given, the latent shape, the reuse mode and the target. Policies are kept in memory, and for a module in
``cache_dir`` when given (:mod:`ertacache.policy.cache`: one file per setting, a file lock, damaged files
replaced); a model that is not a module has no fingerprint and its policies stay with it, in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..core.euler import SampleResult
from ..core.euler import sample as core_sample
from ..core.reuse import DEFAULT_REUSE
from ..errors import ErtaCacheError
from ..fingerprint import model_fingerprint
from ..policy import SCHEMA_VERSION
from ..policy.cache import LOGIC_VERSION, PolicyCache

_MEMORY: dict[str | None, PolicyCache] = {}
_OBJECTS: dict[int, tuple[Any, PolicyCache]] = {}
"""Caches of models that are not modules (no fingerprint): by ``id``, the model kept alive beside its cache so
that its ``id`` cannot pass to another object."""


def sample(model: Any, noise: Tensor, cond: Tensor | None = None, *, target_speedup: float | None = None,
           cache_dir: str | Path | None = None, recalibrate: bool = False, **kwargs: Any) -> SampleResult:
    """:func:`ertacache.core.euler.sample`, or with ``target_speedup`` and no ``policy``, the one line (module
    docstring). ``noise``: ``(B, *latent_shape)`` at t = 1; ``cond``: ``(B, ...)`` or None.

    Raises:
        ErtaCacheError: ``target_speedup`` with a ``policy``, without ``num_inference_steps``, or out of range;
            and whatever :func:`~ertacache.calibration.calibrate` and the sampler raise.
    """
    if target_speedup is None:
        return core_sample(model, noise, cond, **kwargs)
    if kwargs.get("policy") is not None:
        raise ErtaCacheError("give sample a policy or a target_speedup, not both")
    steps = kwargs.get("num_inference_steps")
    if not isinstance(steps, int):
        raise ErtaCacheError("sample with target_speedup needs num_inference_steps=T")
    from .sets import check_target_speedup

    check_target_speedup(target_speedup, steps)
    fingerprint = model_fingerprint(model) if isinstance(model, nn.Module) else None
    setting = {"model": hashlib.sha256(str(fingerprint).encode()).hexdigest()[:16], "T": steps,
               "shift": kwargs.get("shift"), "guidance_scale": kwargs.get("guidance_scale", 1.0),
               "null_cond": kwargs.get("null_cond") is not None, "latent_shape": list(noise.shape[1:]),
               "reuse": kwargs.get("reuse", DEFAULT_REUSE), "target_speedup": float(target_speedup),
               "schema": SCHEMA_VERSION, "logic": LOGIC_VERSION}
    key = "core-" + hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:20]
    if fingerprint is None:
        cache = _OBJECTS.setdefault(id(model), (model, PolicyCache(None)))[1]
    else:
        cache = _MEMORY.setdefault(None if cache_dir is None else str(cache_dir),
                                   PolicyCache(None if cache_dir is None else Path(cache_dir)))
    policy = None if recalibrate else cache.load(key)
    if policy is None:
        with cache.lock(key):
            policy = None if recalibrate else cache.load(key)
            if policy is None:
                policy = _calibrate(model, noise, cond, target_speedup, fingerprint, kwargs)
                cache.store(key, policy)
    return core_sample(model, noise, cond, policy=policy,
                       **{k: v for k, v in kwargs.items() if k != "policy"})


def _calibrate(model: Any, noise: Tensor, cond: Tensor | None, target_speedup: float, fingerprint: str | None,
               kwargs: dict[str, Any]) -> Any:
    import logging

    from . import calibrate

    rows = noise.shape[0]
    logging.getLogger(__name__).warning(
        "ertacache: one-time calibration for this setting (T = %s, %d calibration row%s, about %s uncached "
        "generations of them at %gx)", kwargs["num_inference_steps"], rows, "" if rows == 1 else "s",
        "4-8" if rows == 1 else "4-5", target_speedup)
    keep = ("num_inference_steps", "shift", "guidance_scale", "null_cond")
    return calibrate(model, cond, range(rows), latent_shape=tuple(noise.shape[1:]), target_speedup=target_speedup,
                     model_fingerprint=fingerprint,
                     **{k: kwargs[k] for k in keep if kwargs.get(k) is not None})
