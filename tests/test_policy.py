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


def read_header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ertacache.policy"]), {k: f.get_tensor(k) for k in f.keys()}


def write_header(path, header, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"ertacache.policy": json.dumps(header)})


def write_schema1_pair(policy, json_path):
    """A schema-1 pair as ertacache 0.x wrote it: JSON naming its tensors file, with their SHA-256."""
    import hashlib

    from safetensors.torch import save

    blob = save(policy._tensors())
    json_path.with_suffix(".safetensors").write_bytes(blob)
    doc = {**policy._header(), "schema_version": 1, "tensors": json_path.stem + ".safetensors",
           "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    del doc["guidance"], doc["sample_size"]
    json_path.write_text(json.dumps(doc))
    return json_path


FIELDS = ("num_inference_steps", "cached_steps", "grid", "adjusted_grid", "reuse", "branches", "rect_form",
          "shift", "guidance_scale", "latent_shape", "model_fingerprint", "config", "provenance", "guidance",
          "sample_size")


def assert_same_policy(q, p):
    for name in FIELDS:
        assert getattr(q, name) == getattr(p, name), name
    for branch in p.branches:
        assert torch.equal(q.rect_a[branch], p.rect_a[branch])
        assert torch.equal(q.rect_b[branch], p.rect_b[branch])
    assert torch.equal(q.rect_enabled, p.rect_enabled)


def test_round_trip_is_one_file_that_survives_renaming(tmp_path):
    p = rich_policy()
    path = p.save(tmp_path / "policy.safetensors")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["policy.safetensors"]  # no pair, no temporary files
    moved = path.rename(tmp_path / "renamed.bin")
    q = Policy.load(moved)
    assert_same_policy(q, p)
    assert q.nfe == 5 and q.compute_mask == [True, True, False, False, True, False, True, True]
    # saving the loaded copy writes the same bytes
    q.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == moved.read_bytes()


def test_schema1_pairs_still_load(tmp_path):
    p = rich_policy()
    path = write_schema1_pair(p, tmp_path / "old.json")
    assert_same_policy(Policy.load(path), p)
    st = tmp_path / "old.safetensors"
    st.write_bytes(st.read_bytes()[:-40])
    with pytest.raises(ErtaCacheError, match="SHA-256"):
        Policy.load(path)
    st.unlink()
    with pytest.raises(ErtaCacheError, match="missing"):
        Policy.load(path)


def test_saving_to_json_is_refused_with_the_name_to_use(tmp_path):
    with pytest.raises(ErtaCacheError, match=r"p\.safetensors"):
        rich_policy().save(tmp_path / "p.json")


def test_truncated_file_is_a_clear_error(tmp_path):
    path = rich_policy().save(tmp_path / "p.safetensors")
    blob = path.read_bytes()
    for cut in (4, 60, len(blob) - 40):
        path.write_bytes(blob[:cut])
        with pytest.raises(ErtaCacheError):
            Policy.load(path)


def test_model_weights_are_not_a_policy(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ErtaCacheError, match="without an ertacache policy"):
        Policy.load(tmp_path / "w.safetensors")


def test_other_schema_version_and_format(tmp_path):
    path = rich_policy().save(tmp_path / "p.safetensors")
    header, tensors = read_header(path)
    write_header(path, {**header, "schema_version": 99}, tensors)
    with pytest.raises(ErtaCacheError, match="schema version 99"):
        Policy.load(path)
    write_header(path, {"hello": 1}, tensors)
    with pytest.raises(ErtaCacheError, match="not an ertacache policy"):
        Policy.load(path)


@pytest.mark.parametrize("field, value, match", [
    ("shift", float("nan"), "non-finite"),
    ("shift", -3.0, "shift must be a finite number > 0"),
    ("shift", 1e400, "non-finite"),
    ("num_inference_steps", "8", "num_inference_steps must be an int"),
    ("num_inference_steps", 8.0, "num_inference_steps must be an int"),
    ("cached_steps", [2.0, 3, 5], "cached_steps must be a list of int"),
    ("cached_steps", "235", "cached_steps must be a list"),
    ("guidance_scale", "4.5", "guidance_scale must be a number"),
    ("grid", ["1.0"] * 9, "grid time 0 must be a number"),
    ("branches", "cond", "branches must be"),
    ("latent_shape", [2, -8, 8], "latent_shape"),
    ("config", {"holdout_fraction": "0.2"}, "holdout_fraction"),
    ("provenance", [1], "provenance must be an object"),
])
def test_every_field_is_validated_on_load(tmp_path, field, value, match):
    path = rich_policy().save(tmp_path / "p.safetensors")
    header, tensors = read_header(path)
    header[field] = value
    write_header(path, header, tensors)
    with pytest.raises(ErtaCacheError, match=match):
        Policy.load(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_coefficients_are_refused(tmp_path, value):
    path = rich_policy().save(tmp_path / "p.safetensors")
    header, tensors = read_header(path)
    tensors["rect_a.cond"][3, 1] = value
    write_header(path, header, tensors)
    with pytest.raises(ErtaCacheError, match="non-finite or out-of-range"):
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

    with pytest.raises(ErtaCacheError, match="reuse must be one of"):
        Policy.all_compute(4, reuse="bogus")
    path = Policy.all_compute(4).save(tmp_path / "p.safetensors")
    doc, tensors = read_header(path)
    doc["reuse"] = "bogus"
    write_header(path, doc, tensors)
    with pytest.raises(ErtaCacheError, match="reuse must be one of .*'block_residual'.*got 'bogus'"):
        Policy.load(path)


def test_one_default_reuse_mode():
    """A policy built by hand, an evenly spaced one and a calibrated one reuse alike unless told otherwise."""
    grid = tuple(time_grid(10, 1.0))
    by_hand = Policy(10, (3, 5), grid)
    assert by_hand.reuse == Policy.uniform(10, 5).reuse == CalibrationConfig().reuse == "extrapolate"
