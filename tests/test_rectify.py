import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ertacache.core.rectify import RectStats, apply


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-2, 2), b=st.floats(-1, 1), seed=st.integers(0, 1000))
def test_least_squares_recovers_exact_linear_error(a, b, seed):
    v = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eps = a * v + b
    a_hat, b_hat = RectStats.of(v, eps, "step").solve()
    assert a_hat.item() == pytest.approx(a, abs=1e-5)
    assert b_hat.item() == pytest.approx(b, abs=1e-5)
    # linear rectification then removes the error exactly: v^ = v~ - eps = v
    v_true = v - eps
    torch.testing.assert_close(apply(v.float(), a_hat, b_hat, "linear"), v_true.float(), atol=1e-4, rtol=1e-4)


def test_closed_form_matches_paper_statistics():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, dtype=torch.float64, generator=g)
    eps = 0.3 * v + 0.1 + 0.05 * torch.randn(200, dtype=torch.float64, generator=g)
    stats = RectStats.of(v.view(1, 1, -1), eps.view(1, 1, -1), "step")
    a, b = stats.solve()
    v_bar, e_bar = v.mean(), eps.mean()
    s_vv = ((v - v_bar) ** 2).sum()
    s_ve = ((v - v_bar) * (eps - e_bar)).sum()
    k_paper = 4 * s_ve / s_vv  # Eq. 21
    b_paper = 4 * (e_bar - 0.5) - k_paper * v_bar  # Eq. 21 with the factor-4 slip fixed (NOTES.md 4)
    assert a.item() == pytest.approx((k_paper / 4).item(), rel=1e-5)
    assert 4 * (b.item() - 0.5) == pytest.approx(b_paper.item(), rel=1e-5, abs=1e-6)
    # the sufficient statistics are the paper's sums (Eq. 18-20)
    assert stats.n.item() == 200 and stats.sv.item() == pytest.approx(v.sum().item())
    assert stats.sve.item() == pytest.approx((v * eps).sum().item()) and stats.svv.item() == pytest.approx(
        (v * v).sum().item())


def test_per_channel_fit():
    v = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.stack([0.5 * v[:, 0] + 0.2, -0.25 * v[:, 1] - 0.1], dim=1)
    a, b = RectStats.of(v, eps, "channel").solve()
    torch.testing.assert_close(a, torch.tensor([0.5, -0.25]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b, torch.tensor([0.2, -0.1]), atol=1e-5, rtol=0)


def test_zero_variance_gives_zero_slope():
    v = torch.full((2, 1, 3, 3), 0.7)
    eps = torch.full_like(v, 0.2)
    a, b = RectStats.of(v, eps, "step").solve()
    assert a.item() == 0.0
    assert b.item() == pytest.approx(0.2)


def test_statistics_are_additive():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 2, 3, 3, generator=g)
    eps = 0.4 * v + torch.randn(6, 2, 3, 3, generator=g) * 0.1
    whole = RectStats.of(v, eps, "channel").solve()
    parts = RectStats.of(v[:2], eps[:2], "channel") + RectStats.of(v[2:], eps[2:], "channel")
    summed = RectStats.from_tensor(parts.as_tensor()).solve()
    for x, y in zip(whole, summed):
        torch.testing.assert_close(x, y)


def test_sigmoid_form_is_linear_near_zero():
    v = torch.linspace(-0.01, 0.01, 11).view(1, 1, 11)
    a, b = torch.tensor([0.3]), torch.tensor([0.5])
    # sigmoid(4 a v + 4 (b - 1/2)) = sigmoid(1.2 v) ~ 1/2 + 0.3 v = a v + b
    torch.testing.assert_close(apply(v, a, b, "sigmoid"), apply(v, a, b, "linear"), atol=1e-6, rtol=0)
    assert torch.equal(apply(v, a, b, "off"), v)


def test_channel_layout_of_packed_tokens_matches_unpacked_channels():
    from ertacache.core.rectify import ChannelLayout

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)  # (B, C, H, W)
    eps = 0.3 * x + torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.1
    packed = x.view(3, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 4, 8)  # FLUX's 2x2 packing
    packed_eps = eps.view(3, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 4, 8)
    flux = ChannelLayout(dim=-1, group=4)
    a, b = RectStats.of(x, eps, "channel").solve()
    a2, b2 = RectStats.of(packed, packed_eps, "channel", flux).solve()
    torch.testing.assert_close((a, b), (a2, b2))
    out = apply(x.float(), a, b, "linear")
    out_packed = apply(packed.float(), a2, b2, "linear", flux)
    torch.testing.assert_close(out.view(3, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 4, 8), out_packed)
