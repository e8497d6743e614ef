"""ERTACache: error-rectified, timestep-adjusted caching for diffusion transformers (arXiv 2508.21091).

The core (sampler, cache, calibration, policy) is pure torch. Quick start::

    import ertacache
    policy = ertacache.calibrate(model, cond, seeds, latent_shape=(1, 16, 16),
                                 num_inference_steps=30, target_speedup=2.0)
    policy.save("policy.safetensors")
    out = ertacache.sample(model, noise, cond, policy=ertacache.Policy.load("policy.safetensors"))
"""

from typing import Any

from ._version import __version__
from .calibration import calibrate, calibrate_many, check_target_speedup
from .calibration.auto import sample
from .core.config import CalibrationConfig
from .core.euler import SampleResult, SampleStats, seeded_noise
from .core.grids import time_grid
from .errors import ErtaCacheError, PolicyMismatchError
from .fingerprint import model_fingerprint
from .policy import Policy

_PIPELINE_API = ("apply_ertacache", "calibrate_pipeline", "estimate_pipeline")


def __getattr__(name: str) -> Any:
    """``apply_ertacache``, ``calibrate_pipeline`` and ``estimate_pipeline``: the diffusers integration's own
    functions (their signatures and docstrings), imported on first use so that the core needs no diffusers."""
    if name in _PIPELINE_API:
        try:
            from .integrations import diffusers as integration
        except ImportError as exc:
            raise ImportError(f"ertacache.{name} needs diffusers: pip install 'ertacache[diffusers]' ({exc})") from exc
        return getattr(integration, name)
    raise AttributeError(f"module 'ertacache' has no attribute {name!r}")


__all__ = [
    "CalibrationConfig", "ErtaCacheError", "Policy", "PolicyMismatchError", "SampleResult", "SampleStats",
    "apply_ertacache", "calibrate_pipeline", "estimate_pipeline",
    "__version__", "calibrate", "calibrate_many", "check_target_speedup", "model_fingerprint", "sample",
    "seeded_noise", "time_grid",
]
