"""A reuse mode is one class (issue 20, item 4): registered, it is a CLI choice, calibration prices it through
its own ``weights`` (which must agree with its ``rebuild``), and policies sample with it."""

import pytest
import torch

from ertacache import CalibrationConfig, calibrate, sample, seeded_noise
from ertacache.app.cli import _build_parser
from ertacache.calibration.schedule import reuse_error
from ertacache.core.reuse import REUSE_MODES, History, Reuse, register_reuse


class DampedReuse(Reuse):
    """Half of ``extrapolate``'s step: ``v~_j = v_i + (v_i - v_h)(t_j - t_i) / (2 (t_i - t_h))``."""

    name = "damped"
    needs_history = True
    keeps = "v"

    def keep(self, v, x, block_residual):  # type: ignore[no-untyped-def]
        return v

    def rebuild(self, kept, x, head, history=None):  # type: ignore[no-untyped-def]
        if history is None or history.previous is None or history.t_previous is None:
            return kept
        s = 0.5 * (history.t - history.t_kept) / (history.t_kept - history.t_previous)
        return kept + (kept - history.previous) * s

    def weights(self, t, t_kept, t_previous):  # type: ignore[no-untyped-def]
        if t_previous is None:
            return 1.0, 0.0
        s = 0.5 * (t - t_kept) / (t_kept - t_previous)
        return 1 + s, -s


@pytest.fixture
def damped():
    mode = register_reuse(DampedReuse())
    yield mode
    REUSE_MODES.pop(mode.name)


def test_the_error_model_reads_every_mode_as_it_rebuilds(damped):
    """For every mode that keeps ``v``, the Gram-matrix error of rebuilding step j from computed steps i (and h)
    equals the squared error of the mode's own ``rebuild`` on the outputs."""
    g = torch.Generator().manual_seed(0)
    T, rows, dim = 6, 3, 5
    grid = [1.0, 0.9, 0.75, 0.55, 0.35, 0.15, 0.0]
    v = torch.randn(T, rows, dim, generator=g, dtype=torch.float64)
    basis = torch.cat([v.reshape(T, -1), torch.ones(1, rows * dim, dtype=torch.float64)])
    gram = (basis @ basis.T)[None]  # one branch: <v_a, v_c> summed over rows, the ones vector last
    keeping_v = [name for name, mode in REUSE_MODES.items() if mode.keeps == "v"]
    assert {"velocity", "extrapolate", "damped"} <= set(keeping_v)
    for name in keeping_v:
        mode = REUSE_MODES[name]
        for h, i, j in [(None, 0, 1), (None, 1, 3), (0, 2, 3), (1, 3, 5), (0, 3, 4)]:
            history = History(grid[j], grid[i], None if h is None else v[h], None if h is None else grid[h])
            rebuilt = mode.rebuild(v[i], torch.zeros_like(v[i]), None, history)
            expected = float((rebuilt - v[j]).square().sum())
            assert reuse_error(gram, grid, name, h, i, j, rectified=False) == pytest.approx(expected, rel=1e-9), name


def test_a_registered_mode_is_a_choice_everywhere_and_calibrates(damped, tiny):
    args = _build_parser().parse_args(["calibrate", "--reuse", "damped", "--target-speedup", "2", "--out", "p"])
    assert args.reuse == "damped"
    cond, null = torch.tensor([1, 2, 3, 4]), torch.full((4,), 10)
    kw = dict(latent_shape=(2, 4, 4), num_inference_steps=10, guidance_scale=2.0, null_cond=null)
    policy = calibrate(tiny, cond, [0, 1, 2, 3], target_speedup=2.0, config=CalibrationConfig(reuse="damped"), **kw)
    assert policy.reuse == "damped" and policy.nfe <= 5
    rules = [c.get("rule", "") for c in policy.provenance["candidates"]]
    assert any(r.startswith("extrapolation, ") for r in rules)  # priced with the mode's two-step weights
    noise = seeded_noise([7, 8], (2, 4, 4))
    out = sample(tiny, noise, torch.tensor([1, 2]), guidance_scale=2.0, null_cond=torch.full((2,), 10), policy=policy)
    assert out.stats.nfe == {"cond": policy.nfe, "uncond": policy.nfe} and torch.isfinite(out.x).all()
