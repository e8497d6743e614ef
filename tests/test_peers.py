import json

import pytest
import torch

from ertacache import sample, seeded_noise, time_grid
from ertacache.bench import measure
from ertacache.bench.methods import Method
from ertacache.bench.metrics import psnr
from ertacache.bench.report import nearest_2x, write_report
from ertacache.peers.teacache import TeaCacheModel, fit_coefficients, rel_l1


def modulated(h, ctx):
    return h * (1 + ctx[:, None, None, :])


def test_teacache_threshold_zero_is_uncached(tiny):
    grid = time_grid(10)
    tc = TeaCacheModel(tiny, modulated, 0.0, [1.0, 0.0], grid[0], grid[-2])
    noise = seeded_noise([0, 1], (2, 4, 4))
    cond = torch.tensor([1, 2])
    ref = sample(tiny, noise, cond, num_inference_steps=10).x
    out = sample(tc, noise, cond, num_inference_steps=10).x
    assert torch.equal(out, ref) and tc.nfe == 10


def test_teacache_skips_by_accumulated_change(tiny):
    grid = time_grid(12)
    tc = TeaCacheModel(tiny, modulated, 1e9, [1.0, 0.0], grid[0], grid[-2])
    tiny.block_calls = 0
    sample(tc, seeded_noise([0], (2, 4, 4)), torch.tensor([3]), num_inference_steps=12)
    assert tc.nfe == 2 == tiny.block_calls  # only the first and last steps compute


class SeenConditions(torch.nn.Module):
    """Wraps a split model and records every condition it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, set()

    def embed(self, x, t, cond):
        self.seen |= set(cond.tolist())
        return self.model.embed(x, t, cond)

    def blocks(self, h, ctx):
        return self.model.blocks(h, ctx)

    def head(self, h, ctx):
        return self.model.head(h, ctx)


def test_teacache_polynomial_fit_sees_calibration_conditions_only(tiny):
    spy = SeenConditions(tiny)
    noise = seeded_noise([0, 1, 2], (2, 4, 4))
    coeffs = fit_coefficients(spy, modulated, noise, torch.tensor([1, 2, 3]), 10, guidance_scale=2.0,
                              null_cond=torch.full((3,), 10), degree=2)
    assert spy.seen == {1, 2, 3, 10}  # calibration classes and the null class, nothing held out
    other = fit_coefficients(tiny, modulated, noise, torch.tensor([4, 5, 6]), 10, guidance_scale=2.0,
                             null_cond=torch.full((3,), 10), degree=2)
    assert coeffs != other  # the fit is a function of the calibration data it was given


def test_rel_l1_closed_form():
    assert rel_l1(torch.ones(3), torch.ones(3)) == 0.0
    assert rel_l1(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1.0)


def test_measure_and_report(tiny, tmp_path):
    noise = seeded_noise(range(10), (2, 4, 4))
    labels = torch.arange(10)

    def runner(steps):
        def run(n, c):
            return sample(tiny, n, c, num_inference_steps=steps).x, steps
        return run

    methods = [Method("none", "uncached", runner(12)), Method("uniform", "coarse", runner(6)),
               Method("ertacache", "fake", runner(4)), Method("ablation", "x", runner(12), group="ablation")]
    rows = measure(methods, noise, labels, repeats=2, log=lambda _: None)
    assert [r["nfe"] for r in rows] == [12, 6, 4, 12]
    assert rows[0]["psnr"] is None and rows[0]["ssim"] == pytest.approx(1.0)
    assert rows[3]["psnr"] is None  # identical output to the reference
    # scores against the reference's output computed here; speedups are the median-time ratios
    from ertacache.bench.metrics import psnr

    ref, coarse = runner(12)(noise, labels)[0], runner(6)(noise, labels)[0]
    assert rows[1]["psnr"] == pytest.approx(psnr(coarse, ref), abs=1e-3) and 10 < rows[1]["psnr"] < 100
    h = 5e-5  # seconds are rounded to 4 decimals, speedups to 3
    for r in rows:
        low, high = (rows[0]["seconds"] - h) / (r["seconds"] + h), (rows[0]["seconds"] + h) / (r["seconds"] - h)
        assert low - 5e-4 <= r["speedup"] <= high + 5e-4
    header = {"command": "test", "machine": "here"}
    write_report(tmp_path, rows, header)
    for name in ("results.md", "results.json", "psnr_vs_speedup.png", "grid_2x.png"):
        assert (tmp_path / name).is_file()
    table = (tmp_path / "results.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| ablation | x | 12 |"))
    assert "| identical |" in row  # equal to uncached: it cached nothing, said so (not "ref")
    assert any(line.startswith("| none | uncached | 12 |") and "| ref |" in line for line in table)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {"method", "setting", "nfe", "seconds", "speedup", "psnr", "ssim", "lpips", "peak_mem_mb"} <= set(
        doc["rows"][0])
    assert [r["method"] for r in nearest_2x(rows)] == ["none", "uniform", "ertacache"]


def test_cache_dit_peer_runs_through_its_public_api_on_the_bundled_pipeline():
    """cache-dit's DBCache on the bundled model's FluxPipeline: same grid as the core sampler, fewer forwards at a
    higher threshold, the uncached output when nothing is skipped."""
    from ertacache.bench.methods import BenchSettings, Context, cache_dit_peers
    from ertacache.models.bundled import bundled_model

    bundled = bundled_model("digits")
    model = bundled.load(None)
    settings = BenchSettings(num_inference_steps=20, shift=3.0, quick=True, model="digits")  # DBCache warms up 8
    ctx = Context(model, settings, None, bundled)
    methods = {m.setting + ("+taylorseer" if "taylorseer" in m.name else ""): m for m in cache_dit_peers(ctx)}
    labels, noise = torch.arange(4), seeded_noise(range(500, 504), bundled.latent_shape)
    ref = ctx.policy_runner(None)(noise, labels)[0]
    strict, loose = methods["F1B0, threshold=0.08"], methods["F1B0, threshold=0.2"]
    x_strict, nfe_strict = strict.run(noise, labels)
    x_loose, nfe_loose = loose.run(noise, labels)
    assert nfe_loose < nfe_strict <= 20
    assert psnr(x_strict, ref) > psnr(x_loose, ref) > 20
    x_taylor, nfe_taylor = methods["F1B0, threshold=0.2+taylorseer"].run(noise, labels)
    assert nfe_taylor < 20 and psnr(x_taylor, ref) > 20
    # cache-dit's disable_cache leaves its patched forward behind; the shared model must not carry it, or the
    # methods measured next (FirstBlockCache raised TypeError in the full benchmark's second repeat) break
    assert "forward" not in vars(model.transformer) and torch.equal(ctx.policy_runner(None)(noise, labels)[0], ref)
    from ertacache.peers.diffusers_hooks import TransformerVelocity, peer_config, run_with_cache

    velocity = TransformerVelocity(model, bundled.counted(model))
    config = peer_config("first_block_cache", {"threshold": 0.1}, lambda: velocity.timestep, 20)
    x_fbc, _ = run_with_cache(velocity, config, lambda vel: sample(vel, noise, labels, **ctx.kwargs(labels)).x)
    assert psnr(x_fbc, ref) > 20


@pytest.mark.parametrize("quick", [True, False])
def test_every_peer_setting_builds_its_diffusers_config(quick):
    """One registry feeds both benchmarks: every setting of every sweep is a valid diffusers config, either layout;
    every kind of peer has a runner in the core benchmark."""
    from ertacache.bench.methods import RUNNERS
    from ertacache.peers.diffusers_hooks import peer_config, peer_settings
    from ertacache.peers.registry import PEERS, peer, peers

    hooks = {p.name for p in peers("core", "diffusers_hook")}
    settings = peer_settings(quick, mag_ratios=[1.0] * 20)
    assert {name for name, _ in settings} == hooks == {p.name for p in peers("pipeline", "diffusers_hook")}
    assert {name for name, _ in peer_settings(quick, None)} == hooks - {"magcache"}
    assert {p.kind for p in PEERS} <= set(RUNNERS) and len({p.name for p in PEERS}) == len(PEERS)
    assert all(p.sweep(quick) and all(p.label(s) for s in p.sweep(quick)) for p in PEERS)
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        peer("nope")
    for name, setting in settings:
        for packed in (True, False):
            config = peer_config(name, setting, lambda: 500.0, 20, packed_tokens=packed)
            assert type(config).__name__.lower().replace("config", "") in {
                "firstblockcache", "taylorseercache", "magcache", "pyramidattentionbroadcast", "fastercache"}
    with pytest.raises(ValueError, match="'teacache' is not a diffusers peer"):
        peer_config("teacache", {}, lambda: 500.0, 20)


def test_the_quick_benchmark_calibrates_on_the_models_default_calibration_size():
    """``bench --quick`` judges ERTACache as ``ertacache calibrate`` would run it: on the bundled model's default
    calibration set (20 clips for the video models, whose searched sets 10 clips cannot resolve)."""
    from ertacache.bench.methods import BenchSettings
    from ertacache.models.bundled import MODELS, bundled_model

    for name in MODELS:
        quick = BenchSettings.for_model(name, quick=True)
        assert quick.calibration_per_class == bundled_model(name).calibration_per_class
    assert BenchSettings.for_model("moving-digits", quick=True).calibration_per_class * 10 == 20
