"""Policies that travel: another step count (for_steps), and sharing through a folder or the hub."""

import shutil

import pytest
import torch

from ertacache import Policy, PolicyMismatchError, sample
from ertacache.core.grids import shrink_step, time_grid
from ertacache.errors import ErtaCacheError
from ertacache.policy.hub import POLICY_FILENAME
from ertacache.policy.travel import recovered_phis
from test_policy import assert_same_policy, rich_policy


def test_same_step_count_is_the_policy_itself():
    p = rich_policy()
    assert p.for_steps(8) is p


def nearest_cached(p, q, j):
    """The old cached step nearest in t to the new step j."""
    return min(p.cached_steps, key=lambda i: (abs(p.grid[i] - q.grid[j]), i))


def test_mapping_keeps_the_speedup_coefficients_and_the_ends():
    p = rich_policy()  # T = 8, cached (2, 3, 5), rectified at some of them
    q = p.for_steps(15)
    assert q.num_inference_steps == 15 and q.provenance["mapped_from"] == {"num_inference_steps": 8}
    assert q.nfe == round(p.nfe * 15 / 8) and q.compute_mask[0] and q.compute_mask[-1]
    assert q.grid == tuple(time_grid(15, 3.0))  # a shifted grid is re-made exactly
    for k, name in enumerate(p.branches):
        for j in range(15):
            old = nearest_cached(p, q, j)
            on = j in q.cached_steps and bool(p.rect_enabled[k, old])
            assert bool(q.rect_enabled[k, j]) == on
            if on:
                assert torch.equal(q.rect_a[name][j], p.rect_a[name][old])
                assert torch.equal(q.rect_b[name][j], p.rect_b[name][old])
    assert_same_policy(q.for_steps(15), q)


@pytest.mark.parametrize("steps", [(30, 20), (30, 50), (50, 30), (20, 30)])
def test_evenly_spaced_maps_to_evenly_spaced(steps):
    T, T2 = steps
    q, u = Policy.uniform(T, T // 2, shift=3.0).for_steps(T2), Policy.uniform(T2, T2 // 2, shift=3.0)
    assert q.nfe == u.nfe  # the same computed steps, up to where rounding puts a pair of neighbours
    computed = [[j for j in range(T2) if x.compute_mask[j]] for x in (q, u)]
    assert max(abs(a - b) for a, b in zip(*computed)) <= 1


def test_where_the_calibration_computes_densely_the_mapping_does_too():
    """Computed every step early (t > 0.6) and every third step late: the same at another step count, with no
    run of cached steps longer than the calibrated one (the old relative-position mapping made runs of ten)."""
    grid = time_grid(30, 3.0)
    cached = tuple(i for i in range(1, 29) if grid[i] < 0.6 and i % 3 != 0)
    p = Policy(30, cached, tuple(grid), shift=3.0)
    for T2 in (20, 50):
        q = p.for_steps(T2)
        early = [j for j in range(T2) if q.grid[j] >= 0.62]
        assert all(q.compute_mask[j] for j in early)
        runs = "".join("c" if c else "." for c in q.compute_mask).split("c")
        assert max(len(r) for r in runs) <= 2


def test_timestep_adjustment_factors_are_recovered_and_carried():
    grid = time_grid(10, 3.0)
    adjusted = shrink_step(shrink_step(grid, 3, 0.6), 6, 0.8)
    p = Policy(10, (3, 6), tuple(grid), adjusted_grid=tuple(adjusted), shift=3.0)
    phis = recovered_phis(p)
    assert phis.keys() == {3, 6} and abs(phis[3] - 0.6) < 1e-9 and abs(phis[6] - 0.8) < 1e-9
    q = p.for_steps(19)
    assert len(q.cached_steps) == 19 - round(8 * 19 / 10)
    expected = {j: phis[nearest_cached(p, q, j)] for j in q.cached_steps}
    got = recovered_phis(q)
    assert got.keys() == expected.keys() and all(abs(got[k] - v) < 1e-9 for k, v in expected.items())


def test_core_sampler_refuses_another_step_count_unless_mapped():
    from conftest import LinearField

    p = Policy.uniform(10, 5)
    noise = torch.randn(2, 1, 4, 4)
    with pytest.raises(PolicyMismatchError, match="num_inference_steps: policy 10, got 20"):
        sample(LinearField(), noise, None, num_inference_steps=20, policy=p)
    out = sample(LinearField(), noise, None, num_inference_steps=20, policy=p.for_steps(20))
    assert out.stats.nfe == {"cond": 10} and p.for_steps(20).nfe == 10 and torch.isfinite(out.x).all()


def test_bad_step_count_is_refused():
    with pytest.raises(ErtaCacheError, match="num_inference_steps must be an int >= 2"):
        rich_policy().for_steps(1)


def test_from_pretrained_takes_a_file_or_a_folder(tmp_path):
    p = rich_policy()
    p.save(tmp_path / POLICY_FILENAME)
    assert_same_policy(Policy.from_pretrained(tmp_path), p)
    assert_same_policy(Policy.from_pretrained(tmp_path / POLICY_FILENAME), p)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ErtaCacheError, match=f"holds no {POLICY_FILENAME}"):
        Policy.from_pretrained(tmp_path / "empty")
    with pytest.raises(ErtaCacheError, match="no policy file at"):
        Policy.from_pretrained(tmp_path / "missing.safetensors")


def test_a_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ErtaCacheError, match="cannot fetch .* from the hub repository 'someone/no-such-policy'"):
        Policy.from_pretrained("someone/no-such-policy")


def test_push_to_hub_uploads_one_policy_file_and_a_card(tmp_path):
    class FakeApi:  # the hub's side of HfApi: a repository is a folder
        def create_repo(self, repo_id, private=None, exist_ok=False):
            self.repo = tmp_path / repo_id.replace("/", "--")
            self.repo.mkdir(exist_ok=exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, self.repo, dirs_exist_ok=True)
            return "https://huggingface.co/" + repo_id + "/commit/0"

    api = FakeApi()
    p = rich_policy()
    assert p.push_to_hub("me/flux-policy", api=api).endswith("/commit/0")
    assert sorted(f.name for f in api.repo.iterdir()) == ["README.md", POLICY_FILENAME]
    assert "Policy.from_pretrained" in (api.repo / "README.md").read_text()
    assert_same_policy(Policy.from_pretrained(api.repo), p)
