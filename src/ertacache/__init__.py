"""ERTACache: error-rectified, timestep-adjusted caching for diffusion transformers (arXiv 2508.21091).

The core (sampler, cache, calibration, policy) is pure torch. Quick start::

    import ertacache
    policy = ertacache.calibrate(model, cond, seeds, latent_shape=(1, 16, 16),
                                 num_inference_steps=30, target_speedup=2.0)
    policy.save("policy.safetensors")
    out = ertacache.sample(model, noise, cond, policy=ertacache.Policy.load("policy.safetensors"))
"""

__version__ = "0.1.0"

from .calibration import calibrate, calibrate_many, check_target_speedup  # noqa: E402
from .config import CalibrationConfig  # noqa: E402
from .core.euler import SampleResult, SampleStats, sample, seeded_noise  # noqa: E402
from .core.grids import time_grid  # noqa: E402
from .errors import ErtaCacheError, PolicyMismatchError  # noqa: E402
from .fingerprint import model_fingerprint  # noqa: E402
from .policy import Policy  # noqa: E402


def apply_ertacache(pipe, policy, **kwargs):  # type: ignore[no-untyped-def]
    """Cache a diffusers pipeline by a policy; see :func:`ertacache.integrations.diffusers.apply_ertacache`."""
    from .integrations.diffusers import apply_ertacache as _apply

    return _apply(pipe, policy, **kwargs)


def calibrate_pipeline(pipe, prompts, **kwargs):  # type: ignore[no-untyped-def]
    """Calibrate a policy through a diffusers pipeline's own call; see
    :func:`ertacache.integrations.diffusers.calibrate_pipeline`."""
    from .integrations.diffusers import calibrate_pipeline as _calibrate

    return _calibrate(pipe, prompts, **kwargs)


__all__ = [
    "CalibrationConfig", "ErtaCacheError", "Policy", "PolicyMismatchError", "SampleResult", "SampleStats",
    "apply_ertacache", "calibrate_pipeline",
    "__version__", "calibrate", "calibrate_many", "check_target_speedup", "model_fingerprint", "sample",
    "seeded_noise", "time_grid",
]
