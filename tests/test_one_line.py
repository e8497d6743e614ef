"""One line on a pipeline: apply_ertacache(pipe, target_speedup=2.0); the first call of each setting calibrates on
its own rows, the policy is kept on disk per setting, and what can go wrong is said and survived."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ertacache import apply_ertacache, calibrate_pipeline
from ertacache.errors import ErtaCacheError
from test_workflows import Flux

T = 10


def call(p, steps=T, labels=(3,), **over):
    kw = p.kwargs(labels)
    kw.pop("latents")
    return p.pipe(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                  **{**kw, **over}).images


def test_the_first_call_calibrates_on_its_rows_and_later_calls_reuse(tmp_path, caplog):
    p = Flux()
    cls = type(p.pipe)
    uncached = call(p)
    with caplog.at_level("WARNING", logger="ertacache"):
        handle = apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path)
        first = call(p)
    assert handle.calibrations == 1 and "one-time calibration for these settings" in caplog.text
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    policy = handle.policy
    assert policy.nfe == T // 2 and handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    # the offline calibration on the same row and seed gives the same policy: one method
    kw = p.kwargs((3,))
    kw.pop("latents")
    handle.remove()
    offline = calibrate_pipeline(p.pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=[0], **kw)
    assert offline.cached_steps == policy.cached_steps and offline.grid == policy.grid
    handle = apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path)
    assert torch.equal(call(p), first) and handle.calibrations == 0  # the file, not a new calibration
    call(p, labels=(5, 7))  # other prompts, same setting: no calibration
    assert handle.calibrations == 0
    call(p, steps=12)  # another step count: its own policy
    assert handle.calibrations == 1 and len(list(tmp_path.glob("*.safetensors"))) == 2
    handle.remove()
    assert type(p.pipe) is cls and torch.equal(call(p), uncached)


def test_a_second_process_finds_the_policy(tmp_path):
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_one_line import call
from test_workflows import Flux
from ertacache import apply_ertacache
p = Flux()
h = apply_ertacache(p.pipe, target_speedup=2.0)
call(p)
print("calibrations", h.calibrations)
"""
    env = {**os.environ, "ERTACACHE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert [r.stdout.strip().splitlines()[-1] for r in runs] == ["calibrations 1", "calibrations 0"], runs[1].stderr
    # two processes started together on an empty cache: one calibrates under the lock, the other loads its file
    for f in tmp_path.iterdir():
        f.unlink()
    both = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outs = [b.communicate(timeout=300) for b in both]
    assert sorted(o.strip().splitlines()[-1] for o, _ in outs) == ["calibrations 0", "calibrations 1"], outs
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_processes_of_a_torch_distributed_group_agree_on_one_policy(tmp_path):
    """Each of 2 processes (gloo) calls with its own row: they calibrate together on both rows and get the policy
    one process gets on the two rows; a later call, and a new handle on the same caches, reuse it; different
    settings on the two processes are refused on both."""
    import json
    import socket

    import dist_one_line_worker as worker
    from ertacache.models.digits import digits_flux_pipeline, load_digits_model

    with socket.socket() as sock:  # a free port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(port), worker.__file__, str(tmp_path / "cache"), str(tmp_path / "out")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    model = load_digits_model()
    pipe = digits_flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    one = calibrate_pipeline(pipe, None, num_inference_steps=worker.T, target_speedup=2.0, seeds=[0, 1],
                             **worker.row_kwargs(model, [3, 4]))  # rank 0's row, then rank 1's
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    got = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    assert all("different settings" in g.pop("different") for g in got), got  # each names its own settings
    assert got[0] == got[1], got
    expected = {"cached_steps": list(one.cached_steps), "step_reuse": {str(k): v for k, v in one.step_reuse.items()}}
    assert got[0]["first"] == {**expected, "calibrations": 1}
    assert got[0]["again"] == {**expected, "calibrations": 0}
    assert all(len(list((tmp_path / "cache" / f"rank{r}").glob("*.safetensors"))) == 1 for r in range(2))


def test_a_damaged_cached_file_is_replaced(tmp_path):
    p = Flux()
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path):
        call(p)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path) as handle:
        with pytest.warns(RuntimeWarning, match="cannot be read"):
            call(p)
        assert handle.calibrations == 1
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path) as handle:
        call(p)
        assert handle.calibrations == 0


def test_an_unwritable_cache_warns_once_and_keeps_policies_in_memory(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    p = Flux()
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=blocked / "cache") as handle:
        with pytest.warns(RuntimeWarning, match="cannot write the policy cache"):
            call(p)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            call(p)
        assert handle.calibrations == 1


def test_an_interrupted_first_call_leaves_no_file(tmp_path, monkeypatch):
    from ertacache.integrations.diffusers import calibrate

    p = Flux()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "calibrate_pipeline", interrupted)
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path) as handle:
        with pytest.raises(KeyboardInterrupt):
            call(p)
        assert not list(tmp_path.glob("*.safetensors"))
        monkeypatch.undo()
        call(p)
        assert handle.calibrations == 1


def test_recalibrate_and_bad_arguments(tmp_path):
    p = Flux()
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path):
        call(p)
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path, recalibrate=True) as handle:
        call(p)
        call(p)
        assert handle.calibrations == 1
    with pytest.raises(ErtaCacheError, match="needs a policy, or target_speedup="):
        apply_ertacache(p.pipe)
    with pytest.raises(ErtaCacheError, match="target_speedup"):
        apply_ertacache(p.pipe, target_speedup=0.5, cache_dir=tmp_path)


def test_a_call_with_no_rows_is_one_line_and_writes_nothing(tmp_path):
    p = Flux()
    with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path) as handle:
        kw = p.kwargs((3,))
        kw.pop("latents")
        empty = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        with pytest.raises(ErtaCacheError, match="the calibration set is empty"):
            p.pipe(num_inference_steps=T, output_type="latent", **empty)
        assert not list(tmp_path.glob("*.safetensors")) and handle.calibrations == 0


def test_the_core_sampler_has_the_one_line_too(tmp_path, caplog):
    import ertacache
    from conftest import LinearField
    from ertacache.models.digits import NULL_CLASS, load_digits_model

    model = load_digits_model()
    labels = torch.tensor([3, 7])
    kw = dict(num_inference_steps=T, shift=3.0, guidance_scale=3.0, null_cond=torch.full_like(labels, NULL_CLASS))
    noise = ertacache.seeded_noise([5, 6], (1, 16, 16))
    with caplog.at_level("WARNING", logger="ertacache"):
        out = ertacache.sample(model, noise, labels, target_speedup=2.0, cache_dir=tmp_path, **kw)
    assert caplog.text.count("one-time calibration") == 1 and len(list(tmp_path.glob("core-*.safetensors"))) == 1
    policy = ertacache.calibrate(model, labels, range(2), latent_shape=(1, 16, 16), target_speedup=2.0, **kw)
    assert torch.equal(out.x, ertacache.sample(model, noise, labels, policy=policy, **kw).x)  # the same method
    caplog.clear()
    with caplog.at_level("WARNING", logger="ertacache"):
        again = ertacache.sample(load_digits_model(), noise, labels, target_speedup=2.0, cache_dir=tmp_path, **kw)
    assert "one-time calibration" not in caplog.text and torch.equal(again.x, out.x)  # the file, by fingerprint
    field = LinearField()  # not a module: its policies stay with it, in memory
    a = ertacache.sample(field, torch.randn(1, 1, 4, 4), None, num_inference_steps=T, target_speedup=2.0)
    assert a.stats.nfe == {"cond": T // 2}
    with pytest.raises(ErtaCacheError, match="a policy or a target_speedup"):
        ertacache.sample(field, torch.randn(1, 1, 4, 4), None, num_inference_steps=T, target_speedup=2.0,
                         policy=policy)


def test_a_one_row_call_calibrates_on_more_seeds_of_its_row_when_asked(tmp_path):
    """calibration_rows=4: a first call of one row calibrates on that row with seeds 0..3 (what offline calibration
    of the row repeated gives), under its own key; a call of more rows calibrates on its own rows."""
    p = Flux()
    handle = apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path, calibration_rows=4)
    call(p)
    assert handle.calibrations == 1 and handle.policy.provenance["seeds"] == [0, 1, 2, 3]
    policy = handle.policy
    handle.remove()
    kw = p.kwargs((3, 3, 3, 3))
    kw.pop("latents")
    offline = calibrate_pipeline(p.pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(4), **kw)
    assert offline.cached_steps == policy.cached_steps and offline.grid == policy.grid
    plain = apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path)  # without: another setting's key
    call(p)
    assert plain.calibrations == 1 and plain.policy.provenance["seeds"] == [0]
    plain.remove()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    with pytest.raises(ErtaCacheError, match="calibration_rows must be a whole number >= 1, got 0"):
        apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path, calibration_rows=0)
