"""Calibration at scale: micro-batches, resume from a checkpoint, torch.distributed, cost in the provenance."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ertacache import CalibrationConfig, Policy, calibrate
from ertacache.errors import ErtaCacheError
from ertacache.models.digits import LATENT_SHAPE, NULL_CLASS, load_digits_model

T = 8
N = 6
CONFIG = CalibrationConfig.thorough(thresholds=(0.1, 0.3), max_candidates=2, search_candidates=1, folds=2)


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def run(model, **kw):
    labels = torch.arange(N) % 10
    args = dict(latent_shape=LATENT_SHAPE, num_inference_steps=T, guidance_scale=3.0,
                null_cond=torch.full((N,), NULL_CLASS), target_speedup=2.0, config=CONFIG)
    args.update(kw)
    return calibrate(model, labels, range(N), **args)


def assert_same(a, b, tol=1e-5):
    assert a.cached_steps == b.cached_steps
    assert (a.provenance["selected"], a.provenance["variant"]) == (b.provenance["selected"], b.provenance["variant"])
    assert (a.adjusted_grid is None) == (b.adjusted_grid is None)
    if a.adjusted_grid is not None:
        assert a.adjusted_grid == pytest.approx(b.adjusted_grid, abs=tol)
    for name in a.rect_a:
        torch.testing.assert_close(a.rect_a[name], b.rect_a[name], rtol=0, atol=tol)
        torch.testing.assert_close(a.rect_b[name], b.rect_b[name], rtol=0, atol=tol)


@pytest.fixture(scope="module")
def whole(model):
    return run(model, config=replace(CONFIG, component_check=False))


@pytest.mark.parametrize("batch_size", [1, 3, N])
def test_micro_batches_give_the_same_policy(model, whole, batch_size):
    p = run(model, batch_size=batch_size, config=replace(CONFIG, component_check=False))
    assert whole.adjusted_grid is not None and whole.rect_form == "linear"  # every component is compared
    assert_same(p, whole)


def test_bad_batch_size(model):
    with pytest.raises(ErtaCacheError, match="batch_size must be an int >= 1"):
        run(model, batch_size=0)


def test_cost_is_in_the_provenance(whole):
    cost = whole.provenance["cost"]
    by_pass = cost["by_pass"]
    # ground truth: every row, every step, both branches
    assert by_pass["ground truth"]["passes"] == 1 and by_pass["ground truth"]["model_calls"] == N * T * 2
    assert by_pass["ground truth"]["seconds"] > 0
    assert cost["model_calls"] == sum(p["model_calls"] for p in by_pass.values())
    assert cost["uncached_generations"] == pytest.approx(cost["model_calls"] / (N * T * 2), abs=0.01)
    assert {"policy search", "timestep adjustment", "rectification fit", "evaluation"} <= set(by_pass)


def test_killed_calibration_resumes_to_the_same_policy_with_fewer_calls(model, tmp_path):
    fresh = run(model)

    class Stop(Exception):
        pass

    def stop_after_ground_truth(name):
        if name == "ground truth":
            raise Stop

    with pytest.raises(Stop):
        run(model, checkpoint_dir=tmp_path, callback=stop_after_ground_truth)
    resumed = run(model, checkpoint_dir=tmp_path)
    assert_same(resumed, fresh, tol=0)
    assert resumed.provenance["cost"]["resumed_passes"] == 1
    # the calls made before the interrupt are part of the calibration's cost
    assert resumed.provenance["cost"]["model_calls"] == fresh.provenance["cost"]["model_calls"]
    assert resumed.provenance["cost"]["ground_truth"]["model_calls"] == N * T * 2
    again = run(model, checkpoint_dir=tmp_path)  # everything is kept now: no pass runs, the cost is as recorded
    assert_same(again, fresh, tol=0)
    assert again.provenance["cost"]["model_calls"] == fresh.provenance["cost"]["model_calls"]
    assert again.provenance["cost"]["resumed_passes"] == sum(
        p["passes"] for p in fresh.provenance["cost"]["by_pass"].values())


def test_checkpoint_of_another_calibration_is_refused(model, tmp_path):
    run(model, checkpoint_dir=tmp_path, threshold=0.3, target_speedup=None)
    with pytest.raises(ErtaCacheError, match=r"another calibration: .*num_inference_steps: checkpoint 8, now 10"):
        run(model, checkpoint_dir=tmp_path, num_inference_steps=10)
    with pytest.raises(ErtaCacheError, match=r"another calibration: config"):
        run(model, checkpoint_dir=tmp_path, config=replace(CONFIG, thresholds=(0.2,)))


def test_sweep_early_stop_keeps_the_policy_and_saves_searches(model):
    lambdas = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    config = replace(CONFIG, timestep_adjustment=False, step_reuse_choice=False)  # the sweep is what differs
    full = run(model, config=replace(config, thresholds=lambdas, sweep_early_stop=False))
    early = run(model, config=replace(config, thresholds=lambdas))
    assert_same(early, full, tol=0)
    assert early.provenance["cost"]["by_pass"]["policy search"]["passes"] < \
        full.provenance["cost"]["by_pass"]["policy search"]["passes"]


def _cli(args, launcher=()):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, "-m", "ertacache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_torchrun_two_processes_write_the_single_process_policy(tmp_path):
    common = ["calibrate", "--target-speedup", "2", "--num-inference-steps", "8", "--calibration-per-class", "1",
              "--guidance-scale", "3", "--no-timestep-adjustment"]
    # the two processes also run micro-batches of 3 rows (lockstep across ranks and micro-batches)
    one = _cli([*common, "--out", str(tmp_path / "P1.safetensors")])
    two = _cli([*common, "--batch-size", "3", "--out", str(tmp_path / "P2.safetensors")],
               launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"))
    for proc in (one, two):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    p1, p2 = Policy.load(tmp_path / "P1.safetensors"), Policy.load(tmp_path / "P2.safetensors")
    assert_same(p2, p1)
    assert p2.provenance["cost"]["model_calls"] == p1.provenance["cost"]["model_calls"]


def test_torchrun_pipeline_calibration_matches_one_process(tmp_path):
    """calibrate_pipeline on 2 processes (gloo), each with micro-batches of 2 rows, gives the 1-process policy."""
    from pathlib import Path

    import dist_pipeline_worker as worker

    out = tmp_path / "P2.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            "29534", str(Path(worker.__file__)), str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    one = worker.calibrate()
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    assert_same(Policy.load(out), one)
