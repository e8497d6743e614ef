"""The model fingerprint names the checkpoint, not its state: precision, compilation, offloading and unfused
LoRA adapters leave it; another checkpoint of the same architecture does not."""

import tempfile

import pytest
import torch
from torch import nn

from ertacache import Policy, model_fingerprint, sample, seeded_noise
from ertacache.errors import ErtaCacheError
from ertacache.fingerprint import disagreement, fingerprint_id, legacy_fingerprint, same_model
from ertacache.models.digits import load_digits_model


def quiet(module):
    import logging

    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    return module


def perturbed(model: nn.Module, share: float, seed: int = 0) -> nn.Module:
    """Every weight moved by ``share`` of its tensor's scale (standard deviation), at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(share * p.float().std().nan_to_num(0) * torch.randn(p.shape, generator=g))
    return model


def test_the_same_checkpoint_in_any_precision_and_compiled():
    fp = model_fingerprint(load_digits_model().transformer)
    assert fp == model_fingerprint(load_digits_model().transformer)  # deterministic
    for dtype in (torch.bfloat16, torch.float16):
        assert same_model(fp, quiet(load_digits_model().transformer).to(dtype))
    doubly = quiet(load_digits_model().transformer).to(torch.float16).to(torch.bfloat16)  # rounded twice
    assert same_model(fp, doubly) and same_model(model_fingerprint(doubly), fp)
    assert same_model(fp, torch.compile(load_digits_model().transformer))


def test_rounding_never_reads_as_another_checkpoint():
    """Values over nine decades, in every pair of precisions: no value outside the tolerance."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=g) * 10 ** (torch.rand(64, 256, generator=g) * 9 - 6))
    copies = [lin, *(nn.Linear(256, 64).to(d) for d in (torch.bfloat16, torch.float16, torch.float16))]
    with torch.no_grad():
        for c in copies[1:3]:
            c.load_state_dict(lin.state_dict())
        copies[3].load_state_dict(copies[2].to(torch.bfloat16).state_dict())  # fp32 -> fp16 -> bf16
    prints = [model_fingerprint(c) for c in copies]
    assert all(disagreement(a, b) == 0.0 for a in prints for b in prints)


def test_another_checkpoint_of_the_same_architecture_is_told_apart():
    fp = model_fingerprint(load_digits_model().transformer)
    assert disagreement(fp, model_fingerprint(perturbed(load_digits_model().transformer, 0.01))) > 0.2
    other = load_digits_model()
    with torch.no_grad():
        other.transformer.proj_out.bias.add_(1e-3)  # one bias, 5 % of its values' size
    assert not same_model(fp, other.transformer)
    policy = Policy.uniform(10, 5, model_fingerprint=model_fingerprint(load_digits_model()), reuse="block_residual")
    with pytest.raises(ErtaCacheError, match="model fingerprint: policy fp2-[0-9a-f]{16}, got fp2-"):
        sample(other, seeded_noise([0], (1, 16, 16)), torch.tensor([1]), policy=policy,
               model_fingerprint=model_fingerprint(other))


def test_fingerprints_written_before_values_were_stored_still_compare():
    model = load_digits_model().transformer
    old = legacy_fingerprint(model)
    assert old == "59d45cc93c63f2b5"  # the bundled digits transformer, as policies of ertacache 0.1 recorded it
    assert same_model(old, model) and fingerprint_id(old) == old
    assert not same_model(old, perturbed(load_digits_model().transformer, 0.01))


def test_offloaded_weights_are_read_where_they_live():
    """Group offloading to disk (weights in files), accelerate's sequential offload (meta tensors)."""
    from ertacache.models.digits import digits_flux_pipeline

    fp = model_fingerprint(load_digits_model().transformer)
    tf = load_digits_model().transformer
    tf.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
                            num_blocks_per_group=1, offload_to_disk_path=tempfile.mkdtemp())
    assert model_fingerprint(tf) == fp
    pipe = digits_flux_pipeline(load_digits_model())
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert any(p.is_meta for p in pipe.transformer.parameters())
    assert model_fingerprint(pipe.transformer) == fp


def test_a_meta_weight_nobody_holds_is_a_clear_error():
    with torch.device("meta"):
        lin = nn.Linear(4, 4)
    with pytest.raises(ErtaCacheError, match="'bias' is on the meta device.*check_fingerprint=False"):
        model_fingerprint(lin)
