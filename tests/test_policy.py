import json

import pytest
import torch

from ertacache import CalibrationConfig, Policy, PolicyMismatchError
from ertacache.core.grids import time_grid
from ertacache.errors import ErtaCacheError


def rich_policy() -> Policy:
    T = 8
    g = torch.Generator().manual_seed(0)
    return Policy(
        num_inference_steps=T,
        cached_steps=(2, 3, 5),
        grid=tuple(time_grid(T, 3.0)),
        adjusted_grid=(1.0, 0.95, 0.9, 0.84, 0.75, 0.6, 0.4, 0.2, 0.0),
        reuse="block_residual",
        branches=("cond", "uncond"),
        rect_a={"cond": torch.randn(T, 2, generator=g), "uncond": torch.randn(T, 2, generator=g)},
        rect_b={"cond": torch.randn(T, 2, generator=g), "uncond": torch.randn(T, 2, generator=g)},
        rect_enabled=torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1, 0, 0]], dtype=torch.bool),
        rect_form="linear",
        shift=3.0,
        guidance_scale=4.5,
        latent_shape=(2, 8, 8),
        model_fingerprint="abc123",
        config=CalibrationConfig(granularity="channel", thresholds=(0.1, 0.2)),
        provenance={"seeds": [1, 2, 3], "calibration_size": 3},
    )


def test_round_trip(tmp_path):
    p = rich_policy()
    path = p.save(tmp_path / "policy.json")
    assert (tmp_path / "policy.safetensors").is_file()
    q = Policy.load(path)
    for name in ("num_inference_steps", "cached_steps", "grid", "adjusted_grid", "reuse", "branches", "rect_form",
                 "shift", "guidance_scale", "latent_shape", "model_fingerprint", "config", "provenance",
                 "schema_version"):
        assert getattr(q, name) == getattr(p, name), name
    for branch in p.branches:
        assert torch.equal(q.rect_a[branch], p.rect_a[branch])
        assert torch.equal(q.rect_b[branch], p.rect_b[branch])
    assert torch.equal(q.rect_enabled, p.rect_enabled)
    assert q.nfe == 5 and q.compute_mask == [True, True, False, False, True, False, True, True]
    # saving the loaded copy writes the same JSON
    q.save(tmp_path / "again.json")
    a = json.loads((tmp_path / "policy.json").read_text())
    b = json.loads((tmp_path / "again.json").read_text())
    a.pop("tensors"), b.pop("tensors")
    assert a == b


def test_save_leaves_no_temporary_files(tmp_path):
    rich_policy().save(tmp_path / "p.json")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.json", "p.safetensors"]


def test_truncated_json_is_a_clear_error(tmp_path):
    path = rich_policy().save(tmp_path / "p.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ErtaCacheError, match="not valid JSON"):
        Policy.load(path)


def test_truncated_tensors_are_a_clear_error(tmp_path):
    path = rich_policy().save(tmp_path / "p.json")
    st = tmp_path / "p.safetensors"
    st.write_bytes(st.read_bytes()[:-40])
    with pytest.raises(ErtaCacheError, match="SHA-256"):
        Policy.load(path)


def test_corrupted_tensors_without_hash_are_a_clear_error(tmp_path):
    path = rich_policy().save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["tensors_sha256"] = None
    path.write_text(json.dumps(doc))
    (tmp_path / "p.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ErtaCacheError, match="not a readable safetensors"):
        Policy.load(path)


def test_missing_tensors_file(tmp_path):
    path = rich_policy().save(tmp_path / "p.json")
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(ErtaCacheError, match="missing"):
        Policy.load(path)


def test_other_schema_version_and_format(tmp_path):
    path = rich_policy().save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["schema_version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(ErtaCacheError, match="schema version 99"):
        Policy.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ErtaCacheError, match="not an ertacache policy"):
        Policy.load(path)


def test_mismatch_lists_every_difference():
    p = rich_policy()
    with pytest.raises(PolicyMismatchError) as err:
        p.check_compatible(num_inference_steps=30, guidance_scale=1.0, latent_shape=(2, 16, 16),
                           model_fingerprint="zzz")
    msg = str(err.value)
    for part in ("num_inference_steps: policy 8, got 30", "guidance_scale", "latent shape", "model fingerprint"):
        assert part in msg
    p.check_compatible(num_inference_steps=8, shift=3.0, guidance_scale=4.5, latent_shape=(2, 8, 8))


@pytest.mark.parametrize("cached", [(0,), (7,), (3, 3), (9,)])
def test_invalid_cached_steps(cached):
    with pytest.raises(ErtaCacheError, match="cached_steps"):
        Policy(8, cached, tuple(time_grid(8)))


def test_ablate_switches_components_off():
    p = rich_policy()
    plain = p.ablate(timestep_adjustment=False, rectification=False)
    assert plain.adjusted_grid is None and plain.rect_form == "off" and plain.sampling_grid == p.grid
    assert plain.rectification(0, 2) is None
    assert p.rectification(0, 2) is not None and p.rectification(1, 3) is None


def test_unknown_reuse_mode_is_refused_when_built_and_when_loaded(tmp_path):
    import json

    with pytest.raises(ErtaCacheError, match="reuse must be one of"):
        Policy.all_compute(4, reuse="bogus")
    path = Policy.all_compute(4).save(tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["reuse"] = "bogus"
    path.write_text(json.dumps(doc))
    with pytest.raises(ErtaCacheError, match="reuse must be one of .*'block_residual'.*got 'bogus'"):
        Policy.load(path)
