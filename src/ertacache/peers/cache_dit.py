"""cache-dit (the peer library) through its public API: the DBCache config of one registry setting."""

from __future__ import annotations

from typing import Any

CACHE_DIT_INSTALL = "pip install 'ertacache[bench]'"


def dbcache_config(setting: dict[str, Any], num_inference_steps: int) -> tuple[Any, Any]:
    """``(cache_config, calibrator_config)`` for ``cache_dit.enable_cache`` at one setting of the registry.

    DBCache with ``Fn=1, Bn=0`` (the bundled models have 2-6 blocks, under DBCache's default
    ``Fn=8``) and ``enable_separate_cfg`` (the pipelines call the transformer once per
    branch); with ``taylorseer``, its TaylorSeer calibrator of order 1.

    Raises:
        ImportError: cache-dit is not installed (:data:`CACHE_DIT_INSTALL`).
    """
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    config = DBCacheConfig(num_inference_steps=num_inference_steps, Fn_compute_blocks=1, Bn_compute_blocks=0,
                           residual_diff_threshold=setting["threshold"], enable_separate_cfg=True)
    return config, TaylorSeerCalibratorConfig(taylorseer_order=1) if setting["taylorseer"] else None
