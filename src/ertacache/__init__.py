"""ERTACache: error-rectified, timestep-adjusted caching for diffusion transformers (arXiv 2508.21091).

The core (sampler, cache, calibration, policy) is pure torch. Quick start::

    import ertacache
    policy = ertacache.calibrate(model, cond, seeds, latent_shape=(1, 16, 16),
                                 num_inference_steps=30, target_speedup=2.0)
    policy.save("policy.safetensors")
    out = ertacache.sample(model, noise, cond, policy=ertacache.Policy.load("policy.safetensors"))
"""

__version__ = "0.1.0"

from typing import Any  # noqa: E402

from .calibration import calibrate, calibrate_many, check_target_speedup  # noqa: E402
from .config import CalibrationConfig  # noqa: E402
from .core.euler import SampleResult, SampleStats, sample, seeded_noise  # noqa: E402
from .core.grids import time_grid  # noqa: E402
from .errors import ErtaCacheError, PolicyMismatchError  # noqa: E402
from .fingerprint import model_fingerprint  # noqa: E402
from .policy import Policy  # noqa: E402

_PIPELINE_API = ("apply_ertacache", "calibrate_pipeline")


def __getattr__(name: str) -> Any:
    """``apply_ertacache`` and ``calibrate_pipeline``: the diffusers integration's own functions (their
    signatures and docstrings), imported on first use so that the core needs no diffusers."""
    if name in _PIPELINE_API:
        try:
            from .integrations import diffusers as integration
        except ImportError as exc:
            raise ImportError(f"ertacache.{name} needs diffusers: pip install 'ertacache[diffusers]' ({exc})") from exc
        return getattr(integration, name)
    raise AttributeError(f"module 'ertacache' has no attribute {name!r}")


__all__ = [
    "CalibrationConfig", "ErtaCacheError", "Policy", "PolicyMismatchError", "SampleResult", "SampleStats",
    "apply_ertacache", "calibrate_pipeline",
    "__version__", "calibrate", "calibrate_many", "check_target_speedup", "model_fingerprint", "sample",
    "seeded_noise", "time_grid",
]
