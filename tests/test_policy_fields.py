"""A policy field is declared once: its check, file header, loading, summary, ``uniform(like=)`` and the schema
a file needs all follow from the declaration (``ertacache.policy.fields``)."""

from dataclasses import dataclass, field, fields

import pytest
import torch

from ertacache import CalibrationConfig
from ertacache.errors import ErtaCacheError
from ertacache.policy import Policy
from ertacache.policy import file as policy_file
from ertacache.policy.fields import is_int, spec, spec_of


def _check_hops(value, earlier):
    if not is_int(value) or not 0 <= value < earlier["num_inference_steps"]:
        raise ErtaCacheError(f"hops must be an int in 0..T-1, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class WithHops(Policy):
    """A policy with one more field, declared as the library declares its own."""

    hops: int = field(default=0, metadata=spec(check=_check_hops, optional=True, omit_default=True, schema=3,
                                                like=True, show=lambda v, p: f"hops: {v}" if v else None))


def _policy(cls=Policy, **kw):
    return cls.uniform(10, 5, shift=3.0, branches=("cond", "uncond"), guidance_scale=4.0,
                       model_fingerprint="abc", **kw)


def test_one_declaration_gives_check_file_summary_and_like(tmp_path):
    p = _policy(WithHops, hops=3)
    with pytest.raises(ErtaCacheError, match="hops must be an int in 0..T-1, got 12"):
        _policy(WithHops, hops=12)
    back = WithHops.load(p.save(tmp_path / "p.safetensors"))
    assert back.hops == 3 and "  hops: 3" in back.summary().splitlines()
    doc, _ = policy_file.decode(tmp_path / "p.safetensors")
    assert doc["hops"] == 3 and doc["schema_version"] == 3  # the schema its declaration asks for, not at default
    plain = _policy(WithHops)
    doc, _ = policy_file.decode(plain.save(tmp_path / "q.safetensors"))
    assert "hops" not in doc and doc["schema_version"] == 2 and "hops" not in plain.summary()
    assert Policy.load(tmp_path / "q.safetensors").nfe == plain.nfe  # a reader without the field reads it
    assert WithHops.uniform(10, 4, like=p).hops == 3


def test_a_newer_field_in_an_older_schema_is_refused(tmp_path):
    path = _policy(WithHops, hops=3).save(tmp_path / "p.safetensors")
    doc, tensors = policy_file.decode(path)
    path.write_bytes(policy_file.encode({**doc, "schema_version": 2}, tensors))
    with pytest.raises(ErtaCacheError, match="hops needs schema version 3"):
        WithHops.load(path)


def test_the_header_holds_every_declared_header_field_and_only_those(tmp_path):
    p = Policy(num_inference_steps=6, cached_steps=(2, 3), grid=(1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0),
               step_reuse={2: "velocity"}, config=CalibrationConfig())
    doc, tensors = policy_file.decode(p.save(tmp_path / "p.safetensors"))
    header = {f.name for f in fields(Policy) if spec_of(f).where == "header"}
    assert set(doc) == header | {"format", "nfe", "schema_version"}
    assert not tensors  # rectification off: no coefficients
    assert {f.name for f in fields(Policy) if spec_of(f).where == "tensors"} == {"rect_a", "rect_b", "rect_enabled"}
    back = Policy.load(tmp_path / "p.safetensors")
    for f in fields(Policy):
        assert getattr(back, f.name) == getattr(p, f.name) or f.name == "config", f.name


def test_uniform_like_copies_the_calibrated_settings_and_not_the_decisions():
    rect = {b: torch.zeros(10, 1) for b in ("cond", "uncond")}
    p = _policy(sample_size={"height": 64}, guidance={"guidance_scale": 4.0})
    p = Policy(**{**{f.name: getattr(p, f.name) for f in fields(p)}, "rect_a": rect, "rect_b": rect,
                  "rect_form": "linear", "rect_enabled": torch.zeros(2, 10, dtype=torch.bool)})
    q = Policy.uniform(10, 4, like=p)
    copied = {f.name for f in fields(Policy) if spec_of(f).like}
    assert copied == {"grid", "reuse", "branches", "shift", "guidance_scale", "latent_shape", "model_fingerprint",
                      "config", "guidance", "sample_size"}
    assert all(getattr(q, n) == getattr(p, n) for n in copied)
    assert q.rect_form == "off" and q.nfe == 4 and q.provenance == {}
