"""Shared fixtures: analytic velocity fields and a tiny split model."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("ERTACACHE_TEST_THREADS", "1")))


class ConstantField:
    """``v(x, t, cond) = c`` (times ``cond`` when given): Euler is exact, ``x_0 = x_1 - c``."""

    def __init__(self, c: float = 0.5) -> None:
        self.c = c
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        self.calls += 1
        scale = 1.0 if cond is None else cond.view(-1, *[1] * (x.ndim - 1)).to(x)
        return torch.full_like(x, self.c) * scale


class LinearField:
    """``v(x, t) = k * x``: Euler gives ``x_T = x_0 * prod(1 + k dt_i)``."""

    def __init__(self, k: float = 0.7) -> None:
        self.k = k

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.k * x


class TimeField:
    """``v(x, t) = t * c``: depends on time only."""

    def __init__(self, c: float = 1.0) -> None:
        self.c = c

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return t.view(-1, *[1] * (x.ndim - 1)) * self.c * torch.ones_like(x)


class TinySplit(torch.nn.Module):
    """A small random split model (embed/blocks/head) with a nonlinear block stack."""

    def __init__(self, channels: int = 2, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = torch.nn.Parameter(torch.randn(channels, hidden, generator=g) * 0.5)
        self.w_t = torch.nn.Parameter(torch.randn(hidden, generator=g))
        self.w_c = torch.nn.Parameter(torch.randn(11, hidden, generator=g) * 0.3)
        self.w_blk = torch.nn.Parameter(torch.randn(3, hidden, hidden, generator=g) / hidden**0.5)
        self.w_out = torch.nn.Parameter(torch.randn(hidden, channels, generator=g) * 0.5)
        self.block_calls = 0

    def embed(self, x: Tensor, t: Tensor, cond: Tensor | None):  # type: ignore[no-untyped-def]
        h = torch.einsum("bchw,cd->bhwd", x, self.w_in)
        ctx = t[:, None] * self.w_t + (0 if cond is None else self.w_c[cond.long()])
        return h, ctx

    def blocks(self, h: Tensor, ctx: Tensor) -> Tensor:
        self.block_calls += 1
        for w in self.w_blk:
            h = h + torch.tanh(h @ w + ctx[:, None, None, :])
        return h

    def head(self, h: Tensor, ctx: Tensor) -> Tensor:
        return torch.einsum("bhwd,dc->bchw", h * (1 + 0.1 * ctx[:, None, None, :]), self.w_out)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        h, ctx = self.embed(x, t, cond)
        return self.head(self.blocks(h, ctx), ctx)


@pytest.fixture
def tiny() -> TinySplit:
    return TinySplit().eval().requires_grad_(False)


def assert_every_reuse_mode_on_pipeline(pipe, run, every, ref):
    """On a pipeline: an all-compute policy is bit-exact under every reuse mode (block hooks included), a
    uniform caching policy runs NFE forwards per branch with finite output, and remove() restores exactness."""
    from dataclasses import replace

    from ertacache import apply_ertacache
    from ertacache.core.reuse import REUSE_MODES, get_reuse
    from ertacache.errors import ErtaCacheError
    from ertacache.integrations.diffusers.families import family_for
    from ertacache.policy import uniform_cached_steps

    T = every.num_inference_steps
    for mode in REUSE_MODES:
        if get_reuse(mode).needs_blocks and not family_for(pipe).block_stacks:  # a family with no block stack
            with pytest.raises(ErtaCacheError, match="block"):
                apply_ertacache(pipe, replace(every, reuse=mode))
            continue
        with apply_ertacache(pipe, replace(every, reuse=mode)) as handle:
            assert torch.equal(run(), ref), mode
            assert handle.forwards() == {b: T for b in every.branches}
        cached = replace(every, reuse=mode, cached_steps=uniform_cached_steps(T, T // 2))
        with apply_ertacache(pipe, cached) as handle:
            out = run()
            assert handle.forwards() == {b: T // 2 for b in every.branches}, mode
        assert torch.isfinite(out).all() and not torch.equal(out, ref), mode
        if mode in ORACLE_MODES:  # the same cached sampler, written here from the formulas alone
            expected = oracle_run(pipe, run, set(cached.cached_steps), mode, len(every.branches))
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=mode)
    assert torch.equal(run(), ref)


ORACLE_MODES = ("velocity", "latent_residual", "extrapolate")


def oracle_run(pipe, run, cached_steps, mode, n_branches):
    """``run()`` with the transformer replaced at cached steps by the reuse formula (docs/method.md section 1),
    independent of the library's hooks: ``velocity`` ``v~_j = v_i``; ``latent_residual`` ``v~_j = x_j + v_i - x_i``;
    ``extrapolate`` the line through the last two computed outputs in the call's timestep (an affine map of t:
    the ratio of time differences is the same), ``v_i`` while only one is computed. One history per branch
    (the calls of a step come in branch order)."""
    from unittest import mock

    transformer = pipe.transformer
    forward = transformer.forward
    history = {}  # branch -> [(t, x, v)] of computed steps
    calls, kind, shape = [0], [], []  # kind: the output class of a computed call (return_dict=True)

    def latent(x):  # conditioning channels joined after the latent's (FLUX.1 Fill: packed tokens' last dimension)
        if not shape or x.shape == shape[0]:
            return x
        return x[..., :shape[0][-1]] if x.shape[:-1] == shape[0][:-1] else x[:, :shape[0][1]]

    def replaced(*args, **kwargs):
        step, branch = divmod(calls[0], n_branches)
        calls[0] += 1
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rows = isinstance(x, list)  # Z-Image: a list of one tensor per row in, a list out
        x = torch.stack(x) if rows else x
        time = next((kwargs[k] for k in ("timestep", "timesteps") if k in kwargs), None)  # HiDream: timesteps
        t = float((args[1] if time is None else time).flatten().max())  # per-token times: the noise tokens
        if step not in cached_steps:
            out = forward(*args, **kwargs)
            v = out[0] if isinstance(out, tuple) else out.sample
            v = torch.stack(v) if rows else v
            shape[:] = [v.shape]
            history.setdefault(branch, []).append((t, latent(x).clone(), v.clone()))
            kind[:] = [type(out)]
            return out
        x = latent(x)
        (t_i, x_i, v_i), past = history[branch][-1], history[branch][:-1]
        if mode == "velocity":
            v = v_i
        elif mode == "latent_residual":
            v = x + (v_i - x_i)
        elif not past:
            v = v_i
        else:
            t_h, _, v_h = past[-1]
            v = v_i + (v_i - v_h) * ((t - t_i) / (t_i - t_h))
        v = list(v.unbind(0)) if rows else v
        return kind[0](sample=v) if kind[0] is not tuple else (v,)

    with mock.patch.object(transformer, "forward", replaced):
        return run()


def assert_policy_follows(pipe, run, policy, ref, tol_db=0.25):
    """A calibrated policy on a pipeline: its all-compute version reproduces ``ref`` bit for bit, it runs NFE
    forwards per branch, and it is not below evenly spaced caching (:func:`assert_not_below_uniform`).
    Returns its output."""
    from ertacache import Policy, apply_ertacache

    every = Policy(policy.num_inference_steps, (), policy.grid, branches=policy.branches,
                   model_fingerprint=policy.model_fingerprint)
    with apply_ertacache(pipe, every):
        assert torch.equal(run(), ref)
    with apply_ertacache(pipe, policy) as handle:
        out = run()
        assert handle.forwards() == dict.fromkeys(policy.branches, policy.nfe)
    assert_not_below_uniform(pipe, run, policy, out, ref, tol_db)
    return out


def assert_not_below_uniform(pipe, run, policy, out, ref, tol_db=0.25):
    """The fidelity bound of a calibrated policy on a pipeline: its output ``out`` is no more than ``tol_db`` below
    evenly spaced caching at the same NFE (same reuse, branches and grid), in PSNR against ``ref``."""
    from ertacache import Policy, apply_ertacache

    with apply_ertacache(pipe, Policy.uniform(policy.num_inference_steps, policy.nfe, like=policy)):
        uniform = run()
    err, err_uniform = float((out - ref).double().square().mean()), float((uniform - ref).double().square().mean())
    assert 0 < err <= err_uniform * 10 ** (tol_db / 10), (err, err_uniform)
