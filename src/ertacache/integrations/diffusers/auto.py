"""One line: ``apply_ertacache(pipe, target_speedup=2.0)``. The first call with new settings calibrates on its own
rows, and the policy is kept on disk, one file per setting, for every later call and process.

A call's settings are what a policy is checked against: the checkpoint (its fingerprint) and any LoRA adapters,
the pipeline and scheduler classes and the scheduler's grid settings, the step count, strength, size or frame
count, every guidance argument the call passes, the target, the policy schema and :data:`LOGIC_VERSION` (a
policy of an older decision rule is not reused). A call with settings the cache has no policy for:

1. says once, on the ``ertacache`` logger, that this is a one-time calibration and what it will cost;
2. calibrates with the default configuration on the call's own rows (its prompts, or its ``prompt_embeds``
   rows; seeds ``0..N-1``), or on ``calibration_prompts`` where given, under a file lock (another process
   calibrating the same setting finishes first, and this one loads its file);
3. writes the policy atomically to ``<cache_dir>/<key>.safetensors`` (an unwritable directory: one warning, the
   policy is kept in memory) and runs the call with it: the first call returns the cached output.

A cached file that cannot be read is replaced (one warning). ``recalibrate=True`` calibrates once more for
each setting met. The cache directory is ``cache_dir``, else ``$ERTACACHE_CACHE``, else
``$XDG_CACHE_HOME/ertacache`` (``~/.cache/ertacache``).

Under ``torch.distributed`` (every process calls the pipeline with its own rows, as data-parallel inference
does), the processes agree on one policy: their settings must be the same (else an error on every process); a
policy is taken from the cache only where every process finds the same one; otherwise they calibrate together
on all their rows (:func:`~.calibrate.calibrate_pipeline` with ``local_rows=True``: each process walks its own
rows, statistics are summed over processes) and each process whose cache lacked it writes it. No file lock is
taken there (a process waiting on another's lock would never join the collective calibration).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...calibration.distributed import rank_and_size, same_on_every_rank
from ...calibration.judge import evaluation_key
from ...errors import ErtaCacheError
from ...fingerprint import adapters_of, fingerprint_id, model_fingerprint
from ...policy import SCHEMA_VERSION, Policy
from ...policy.cache import LOGIC_VERSION, PolicyCache, cache_home
from .adapters import embeds_rows, per_row, take_rows
from .families import Family, family_for, transformers_of

logger = logging.getLogger(__name__)

SETTING_ARGUMENTS = ("num_inference_steps", "height", "width", "num_frames", "strength", "guidance_scale",
                     "true_cfg_scale", "guidance_scale_2", "num_images_per_prompt")
"""The call's arguments that are part of its setting (as passed; a default is its own setting)."""
ROW_ARGUMENTS = ("prompt", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt", "negative_prompt_embeds",
                 "negative_pooled_prompt_embeds", "prompt_attention_mask", "negative_prompt_attention_mask",
                 "image")
"""The call's per-row inputs that calibration takes as its calibration set."""
NOT_FOR_CALIBRATION = ("generator", "latents", "output_type", "return_dict", "callback_on_step_end",
                       "callback_on_step_end_tensor_inputs", "num_images_per_prompt")


def setting_key(pipe: Any, family: Family, kwargs: dict[str, Any], target_speedup: float,
                check_prompts: list[str] | None = None, calibration_rows: int | None = None) -> tuple[str, dict]:
    """``(file stem, the setting)`` of a call: a hash of everything a policy is checked against, the
    ``check_prompts`` its calibration was checked on and the ``calibration_rows`` it asked for, where given."""
    transformers = transformers_of(pipe, family)
    adapters = {}
    for tf in transformers:
        for name, fused in adapters_of(tf).items():
            config: Any = getattr(tf, "peft_config", {}).get(name)
            adapters[name] = {"fused": fused, "config": repr(config.to_dict() if hasattr(config, "to_dict")
                                                              else config)}
    scheduler = pipe.scheduler
    fingerprint = model_fingerprint(transformers)
    setting = {
        "model": fingerprint_id(fingerprint),
        "model_values": hashlib.sha256(fingerprint.encode()).hexdigest()[:16],
        "adapters": adapters, "pipeline": type(pipe).__name__, "scheduler": type(scheduler).__name__,
        "pipeline_config": {k: v for k, v in dict(getattr(pipe, "config", {})).items()  # Wan 2.2's boundary_ratio
                            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))},
        "scheduler_config": {k: v for k, v in dict(scheduler.config).items()
                             if isinstance(v, (int, float, bool, str, type(None)))},
        "call": {k: kwargs[k] for k in SETTING_ARGUMENTS if isinstance(kwargs.get(k), (int, float, bool))},
        "target_speedup": float(target_speedup), "schema": SCHEMA_VERSION, "logic": LOGIC_VERSION,
        **({"check_prompts": list(check_prompts)} if check_prompts else {}),
        **({"calibration_rows": int(calibration_rows)} if calibration_rows else {}),
    }
    digest = hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return digest, setting


class AutoCache:
    """What ``apply_ertacache(pipe, target_speedup=...)`` installs: the pipeline's class is swapped for a subclass
    whose ``__call__`` finds or calibrates the policy of the call's setting, applies it, and runs the call."""

    def __init__(self, pipe: Any, target_speedup: float, cache_dir: str | Path | None, recalibrate: bool,
                 calibration_prompts: list[str] | None, apply: Callable[[Policy], Any],
                 check_prompts: list[str] | None = None, calibration_rows: int | None = None) -> None:
        from ...calibration.sets import check_target_speedup

        self.pipe, self.family = pipe, family_for(pipe)
        check_target_speedup(target_speedup, 10**6)
        self.target_speedup = float(target_speedup)
        self.cache = PolicyCache(Path(cache_dir) if cache_dir is not None else cache_home())
        self.recalibrate, self.calibration_prompts = recalibrate, calibration_prompts
        self.check_prompts, self.calibration_rows = check_prompts, calibration_rows
        self.apply = apply
        self.redone: set[str] = set()
        self.calibrating = False
        self.calibrations = 0
        self.handle: Any = None
        self.key: str | None = None
        self.original_class = type(pipe)
        auto = self

        signature = inspect.signature(self.original_class.__call__)

        class Cached(self.original_class):  # type: ignore[name-defined, misc]
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                if auto.calibrating:  # calibration's own calls (micro-batch threads included) run as they are
                    return super().__call__(*args, **kwargs)
                bound = signature.bind_partial(self, *args, **kwargs).arguments
                named = {k: v for k, v in bound.items() if k != "self" and k != "kwargs"}
                named.update(bound.get("kwargs", {}))
                return auto.call(super().__call__, named)

        Cached.__name__ = Cached.__qualname__ = self.original_class.__name__
        pipe.__class__ = Cached

    def policy_for(self, kwargs: dict[str, Any]) -> tuple[str, Policy]:
        key, setting = setting_key(self.pipe, self.family, kwargs, self.target_speedup, self.check_prompts,
                                   self.calibration_rows)
        if rank_and_size()[1] > 1:
            return key, self.agreed_policy(key, setting, kwargs)
        redo = self.recalibrate and key not in self.redone
        policy = None if redo else self.cache.load(key)
        if policy is not None:
            return key, policy
        with self.cache.lock(key):
            policy = None if redo else self.cache.load(key)  # another process may have written it meanwhile
            if policy is None:
                policy = self.calibrate(kwargs, setting)
                self.cache.store(key, policy)
                self.redone.add(key)
        return key, policy

    def agreed_policy(self, key: str, setting: dict[str, Any], kwargs: dict[str, Any]) -> Policy:
        """One policy for every process of the group (see the module docstring).

        Raises:
            ErtaCacheError: the processes call with different settings.
        """
        if not same_on_every_rank(_as_int(key)):
            raise ErtaCacheError(f"the processes call the pipeline with different settings (this one: "
                                 f"{setting['call']}); under torch.distributed every process must use the same "
                                 "settings (step count, size, guidance, scheduler, model)")
        redo = self.recalibrate and key not in self.redone
        found = None if redo else self.cache.load(key)
        mark = _as_int(evaluation_key(found)) if found is not None else 0  # 0: not found (every process asks)
        if same_on_every_rank(mark) and found is not None:
            return found
        policy = self.calibrate(kwargs, setting, local_rows=True)
        if found is None or evaluation_key(found) != evaluation_key(policy):
            self.cache.store(key, policy)
        self.redone.add(key)
        return policy

    def calibrate(self, kwargs: dict[str, Any], setting: dict[str, Any], local_rows: bool = False) -> Policy:
        from .calibrate import calibrate_pipeline

        steps = int(kwargs.get("num_inference_steps") or _default_steps(self.pipe))
        pipe_kwargs = {k: v for k, v in kwargs.items() if k not in NOT_FOR_CALIBRATION and k != "num_inference_steps"}
        prompts = self.calibration_prompts
        if prompts is None:
            prompt = pipe_kwargs.pop("prompt", None)
            prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        else:
            for k in ROW_ARGUMENTS:
                if k.startswith("prompt") or k == "prompt":
                    pipe_kwargs.pop(k, None)
        rows = len(prompts) if prompts is not None else _rows(pipe_kwargs)
        if self.calibration_rows and rows < self.calibration_rows:
            prompts, pipe_kwargs = repeated_rows(prompts, pipe_kwargs, rows, self.calibration_rows, self.family)
            rows = self.calibration_rows
        logger.warning("ertacache: one-time calibration for these settings (%s; %d calibration row%s, about %s "
                       "uncached generations of them at %gx); later calls with these settings reuse it",
                       ", ".join(f"{k}={v}" for k, v in setting["call"].items()) or "the pipeline's defaults",
                       rows, "" if rows == 1 else "s", "4-8" if rows == 1 else "4-5", self.target_speedup)
        self.remove_inner()
        self.calibrating = True
        try:
            policy = calibrate_pipeline(self.pipe, prompts, num_inference_steps=steps,
                                        target_speedup=self.target_speedup, local_rows=local_rows,
                                        check_prompts=self.check_prompts, **pipe_kwargs)
        finally:
            self.calibrating = False
        self.calibrations += 1
        return policy

    def call(self, run: Any, kwargs: dict[str, Any]) -> Any:
        key, policy = self.policy_for(kwargs)
        if key != self.key or self.handle is None:
            self.remove_inner()
            self.handle = self.apply(policy)
            self.key = key
        return run(**kwargs)

    def remove_inner(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle, self.key = None, None

    def remove(self) -> None:
        self.remove_inner()
        self.pipe.__class__ = self.original_class


class AutoHandle:
    """What ``apply_ertacache(pipe, target_speedup=...)`` returns: ``remove()``, a context manager, the last call's
    stats (:meth:`forwards`, :meth:`steps`), the policy in use (:attr:`policy`) and :attr:`calibrations` (how
    many calibrations this handle ran)."""

    def __init__(self, auto: AutoCache) -> None:
        self.auto = auto

    @property
    def policy(self) -> Policy | None:
        return None if self.auto.handle is None else self.auto.handle.policy

    @property
    def calibrations(self) -> int:
        return self.auto.calibrations

    @property
    def cache_dir(self) -> Path | None:
        return self.auto.cache.directory

    def forwards(self) -> dict[str, int]:
        """Transformer forwards of the last call per branch (NFE per branch); calibration calls not counted."""
        if self.auto.handle is None:
            raise ErtaCacheError("no call has run under this handle yet")
        return dict(self.auto.handle.forwards())

    def steps(self, transformer: int | None = None) -> dict[str, dict[str, list[int]]]:
        if self.auto.handle is None:
            raise ErtaCacheError("no call has run under this handle yet")
        return dict(self.auto.handle.steps(transformer))

    def remove(self) -> None:
        """The pipeline exactly as before: its class back, the hooks of the policy in use removed."""
        self.auto.remove()

    def __enter__(self) -> AutoHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _default_steps(pipe: Any) -> int:
    default = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    if default is None or not isinstance(default.default, int):
        raise ErtaCacheError(f"{type(pipe).__name__}: pass num_inference_steps to the call")
    return int(default.default)


def repeated_rows(prompts: list[str] | None, kwargs: dict[str, Any], rows: int, wanted: int,
                  family: Family) -> tuple[list[str] | None, dict[str, Any]]:
    """The call's ``rows`` rows repeated in turn to ``wanted`` rows (prompts, and each argument with one entry per
    row, :func:`~.adapters.per_row` on the family's row dimension); calibration draws each row's own noise."""
    order = [i % rows for i in range(wanted)]
    out = {key: take_rows(value, order, family.row_dim(key)) if per_row(value, rows, family.row_dim(key)) else value
           for key, value in kwargs.items()}
    return (None if prompts is None else [prompts[i] for i in order]), out


def _as_int(text: str) -> int:
    """A 60-bit number from a string's hash (what processes compare)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _rows(kwargs: dict[str, Any]) -> int:
    rows = embeds_rows(kwargs)
    if rows is None:
        raise ErtaCacheError("the call has neither a prompt nor prompt_embeds to calibrate on; pass "
                             "calibration_prompts= to apply_ertacache")
    return rows
