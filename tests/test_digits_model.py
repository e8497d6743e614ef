import json

import pytest
import torch

from ertacache import sample, seeded_noise
from ertacache.errors import ErtaCacheError
from ertacache.models.digits import (
    NULL_CLASS,
    bundled_weights_path,
    digits_images,
    image_ids,
    load_digits_model,
    pack,
    unpack,
)


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


def test_bundled_weights_are_committed_with_their_command():
    path = bundled_weights_path()
    assert path.is_file() and path.stat().st_size <= 25 * 2**20
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["command"].startswith("python -m training.train_digits")
    assert "--seed 0" in meta["command"]


def test_loads_offline_and_samples_in_range(model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    labels = torch.tensor([0, 7])
    noise = seeded_noise([1, 2], (1, 16, 16))
    out = sample(model, noise, labels, num_inference_steps=12, guidance_scale=3.0,
                 null_cond=torch.full_like(labels, NULL_CLASS))
    assert out.x.shape == (2, 1, 16, 16) and out.x.dtype == torch.float32
    assert torch.isfinite(out.x).all()
    assert out.x.min() > -1.6 and out.x.max() < 1.6  # data lie in [-1, 1]; a trained model stays near


def test_samples_look_like_the_requested_digit(model):
    """Nearest-class-mean check against the training data: the model draws the digit it is asked for."""
    x_data, y_data = digits_images()
    means = torch.stack([x_data[y_data == k].mean(0) for k in range(10)])
    labels = torch.arange(10).repeat(2)
    out = sample(model, seeded_noise(range(20), (1, 16, 16)), labels, num_inference_steps=20, guidance_scale=3.0,
                 null_cond=torch.full_like(labels, NULL_CLASS)).x
    dist = ((out[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == labels).float().mean() >= 0.9


def test_split_equals_transformer_forward(model):
    """embed/blocks/head reproduce FluxTransformer2DModel.forward exactly."""
    x = seeded_noise([3, 4], (1, 16, 16))
    t = torch.tensor([0.3, 0.8])
    labels = torch.tensor([2, NULL_CLASS])
    tokens, pooled = model.prompt_embeds(labels)
    with torch.no_grad():
        ref = model.transformer(hidden_states=pack(x), encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=t, img_ids=image_ids(), txt_ids=torch.zeros(tokens.shape[1], 3)).sample
        torch.testing.assert_close(model(x, t, labels), unpack(ref), rtol=1e-5, atol=1e-5)


def test_pack_roundtrip():
    x = torch.randn(3, 2, 16, 16)
    assert torch.equal(unpack(pack(x)), x)


def test_bad_labels_and_missing_weights(model, tmp_path):
    with pytest.raises(ErtaCacheError, match="class labels"):
        model(torch.zeros(1, 1, 16, 16), torch.ones(1), torch.tensor([11]))
    with pytest.raises(ErtaCacheError, match="no weights"):
        load_digits_model(tmp_path / "missing.safetensors")
