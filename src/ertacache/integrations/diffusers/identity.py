"""Is this the model the policy was calibrated on? The fingerprint check at apply, and LoRA adapters.

Adapters (peft LoRA, loaded by diffusers' ``load_lora_weights`` or peft's ``inject_adapter``) leave the base
checkpoint in place: the base policy applies, with one :class:`AdapterWarning` per set of adapters. Adapters
fused into the weights (``fuse_lora``) make another checkpoint, refused like any other.
"""

from __future__ import annotations

import warnings
from typing import Any

from ...errors import PolicyMismatchError
from ...fingerprint import adapters_of, fingerprint_id, model_fingerprint, same_model
from ...policy import Policy
from .families import Family, transformers_of

OVERRIDE = "apply with check_fingerprint=False (CLI: --no-check-fingerprint) to use it anyway"


class AdapterWarning(UserWarning):
    """A policy calibrated on the base model is applied to a transformer with LoRA adapters."""


def pipeline_adapters(pipe: Any, family: Family) -> dict[str, bool]:
    """The adapters on the pipeline's transformers: name -> fused."""
    return {name: fused for tf in transformers_of(pipe, family) for name, fused in adapters_of(tf).items()}


def check_identity(pipe: Any, family: Family, policy: Policy) -> None:
    """Refuse another checkpoint than the policy's (:func:`~ertacache.fingerprint.same_model`).

    Raises:
        PolicyMismatchError: another checkpoint; fused LoRA weights are named as the cause.
    """
    if policy.model_fingerprint is None:
        return
    got = model_fingerprint(transformers_of(pipe, family))
    if same_model(policy.model_fingerprint, got):
        return
    fused = sorted(name for name, f in pipeline_adapters(pipe, family).items() if f)
    ids = f"policy {fingerprint_id(policy.model_fingerprint)}, got {fingerprint_id(got)}"
    if fused:
        raise PolicyMismatchError(
            f"model fingerprint ({ids}): LoRA adapter(s) {fused} are fused into the transformer's weights, which "
            f"makes another checkpoint than the policy's; recalibrate on the fused model, or {OVERRIDE}")
    raise PolicyMismatchError(f"model fingerprint ({ids}): another checkpoint than the policy was calibrated on; "
                              f"calibrate a policy for this model, or {OVERRIDE}")


class AdapterWatch:
    """Warns once per set of (unfused) adapters it sees on the pipeline: at apply, and at each call (an adapter
    loaded after apply is seen at the next call)."""

    def __init__(self, pipe: Any, family: Family, policy: Policy) -> None:
        self.pipe, self.family, self.policy = pipe, family, policy
        self.seen: set[frozenset[str]] = set()

    def __call__(self) -> None:
        adapters = frozenset(n for n, fused in pipeline_adapters(self.pipe, self.family).items() if not fused)
        if not adapters or adapters in self.seen:
            return
        self.seen.add(adapters)
        warnings.warn(
            f"ertacache: the transformer carries LoRA adapter(s) {sorted(adapters)}; the policy was calibrated on "
            "the base model and is applied as it is (adapters of moderate strength cost little: docs/diffusers.md, "
            "'LoRA adapters'). Recalibrate on the adapted pipeline to be sure.", AdapterWarning, stacklevel=3)
