import math

import pytest
import torch

import ertacache
from conftest import ConstantField, LinearField, TimeField
from ertacache import Policy, sample, seeded_noise, time_grid
from ertacache.errors import ErtaCacheError


def reference_euler(model, x, cond, grid, guidance_scale=1.0, null_cond=None):
    """An independent plain Euler loop, for comparison."""
    for i in range(len(grid) - 1):
        t = torch.full((x.shape[0],), grid[i])
        if null_cond is None:
            v = model(x, t, cond)
        else:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
            vc, vu = both.chunk(2)
            v = vu + guidance_scale * (vc - vu)
        x = x + (grid[i + 1] - grid[i]) * v
    return x


def test_time_grid_closed_form():
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    g = time_grid(4, shift=3.0)
    s = 0.5
    assert g[2] == pytest.approx(3 * s / (1 + 2 * s))
    assert g[0] == 1.0 and g[-1] == 0.0
    assert all(a > b for a, b in zip(g, g[1:]))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_time_grid_rejects_bad_steps(bad):
    with pytest.raises(ErtaCacheError, match="num_inference_steps"):
        time_grid(bad)


def test_constant_field_exact():
    model = ConstantField(0.5)
    noise = seeded_noise([1, 2], (1, 4, 4))
    out = sample(model, noise, None, num_inference_steps=7, shift=3.0)
    torch.testing.assert_close(out.x, noise - 0.5)
    assert out.stats.nfe == {"cond": 7}


def test_linear_field_matches_euler_product():
    k = 0.7
    grid = time_grid(10, shift=2.0)
    noise = seeded_noise([3], (2, 3, 3), dtype=torch.float64)
    out = sample(LinearField(k), noise, None, num_inference_steps=10, shift=2.0)
    factor = math.prod(1 + k * (grid[i + 1] - grid[i]) for i in range(10))
    torch.testing.assert_close(out.x, noise * factor)


def test_guidance_combines_branches_analytically():
    model = ConstantField(1.0)
    noise = torch.zeros(3, 1, 2, 2)
    cond, null = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 1.0])
    out = sample(model, noise, cond, num_inference_steps=5, guidance_scale=4.0, null_cond=null)
    # v = v_u + s (v_c - v_u) = 1 + 4 * (2 - 1) = 5, integrated over t: 1 -> 0
    torch.testing.assert_close(out.x, torch.full_like(noise, -5.0))
    assert out.stats.nfe == {"cond": 5, "uncond": 5}


@pytest.mark.parametrize("reuse", ["velocity", "latent_residual", "block_residual"])
def test_all_compute_policy_is_bit_identical(tiny, reuse):
    noise = seeded_noise([0, 1, 2], (2, 4, 4))
    cond, null = torch.tensor([1, 2, 3]), torch.full((3,), 10)
    ref = sample(tiny, noise, cond, num_inference_steps=12, shift=3.0, guidance_scale=3.0, null_cond=null)
    policy = Policy.all_compute(12, shift=3.0, reuse=reuse, branches=("cond", "uncond"), guidance_scale=3.0)
    out = sample(tiny, noise, cond, guidance_scale=3.0, null_cond=null, policy=policy)
    assert torch.equal(out.x, ref.x)
    independent = reference_euler(tiny, noise, cond, time_grid(12, 3.0), 3.0, null)
    assert torch.equal(ref.x, independent)


def test_cached_steps_skip_blocks_and_count_nfe(tiny):
    noise = seeded_noise([0], (2, 4, 4))
    policy = Policy.uniform(10, nfe=4, reuse="block_residual")
    tiny.block_calls = 0
    out = sample(tiny, noise, torch.tensor([1]), policy=policy)
    assert tiny.block_calls == 4 == policy.nfe
    assert out.stats.computed_steps == [0, 3, 6, 9]
    assert out.stats.cached_steps == [1, 2, 4, 5, 7, 8]
    assert out.stats.nfe == {"cond": 4}


def test_velocity_reuse_is_exact_on_constant_field():
    noise = seeded_noise([5], (1, 3, 3))
    policy = Policy.uniform(9, nfe=3, reuse="velocity")
    model = ConstantField(0.25)
    out = sample(model, noise, None, policy=policy)
    torch.testing.assert_close(out.x, noise - 0.25)
    assert model.calls == 3


def test_latent_residual_reuse_follows_eq6():
    # v = t c; compute step 0 at t=1: r = c - x_0; cached step 1: v~ = x_1 + r
    noise = torch.ones(1, 1, 1, 1)
    policy = Policy(4, (1,), tuple(time_grid(4)), reuse="latent_residual")
    out = sample(TimeField(2.0), noise, None, policy=policy)
    x0 = 1.0
    r = 2.0 - x0
    x1 = x0 - 0.25 * 2.0
    x2 = x1 - 0.25 * (x1 + r)
    x3 = x2 - 0.25 * (0.5 * 2.0)
    x4 = x3 - 0.25 * (0.25 * 2.0)
    assert out.x.item() == pytest.approx(x4)


def test_sample_errors():
    noise = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ErtaCacheError, match="num_inference_steps"):
        sample(ConstantField(), noise)
    with pytest.raises(ErtaCacheError, match="null_cond"):
        sample(ConstantField(), noise, torch.ones(1), num_inference_steps=3, guidance_scale=2.0)
    with pytest.raises(ErtaCacheError, match="block_residual"):
        sample(ConstantField(), noise, None, policy=Policy.uniform(6, 3, reuse="block_residual"))


def test_policy_for_other_step_count_is_refused():
    policy = Policy.uniform(10, 5)
    with pytest.raises(ertacache.PolicyMismatchError, match="num_inference_steps: policy 10, got 20"):
        sample(ConstantField(), torch.zeros(1, 1, 2, 2), num_inference_steps=20, policy=policy)
    with pytest.raises(ertacache.PolicyMismatchError, match="shift"):
        sample(ConstantField(), torch.zeros(1, 1, 2, 2), shift=3.0, policy=policy)


def test_batch_rows_are_independent(tiny):
    """One policy for the batch, residuals per sample: a sample's output does not depend on its batch mates."""
    noise = seeded_noise([0, 1, 2, 3], (2, 4, 4))
    cond = torch.tensor([1, 2, 3, 4])
    policy = Policy.uniform(8, 4, reuse="block_residual")
    both = sample(tiny, noise, cond, policy=policy).x
    alone = sample(tiny, noise[2:3], cond[2:3], policy=policy).x
    torch.testing.assert_close(both[2:3], alone, rtol=1e-5, atol=1e-6)
