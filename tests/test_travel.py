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


def test_mapping_keeps_relative_positions_coefficients_and_the_ends():
    p = rich_policy()  # T = 8, cached (2, 3, 5), rectified at some of them
    q = p.for_steps(15)
    assert q.num_inference_steps == 15 and q.provenance["mapped_from"] == {"num_inference_steps": 8}
    nearest = [int(j * 7 / 14 + 0.5) for j in range(15)]
    assert q.cached_steps == tuple(j for j in range(1, 14) if nearest[j] in (2, 3, 5))
    assert q.compute_mask[0] and q.compute_mask[-1]
    assert q.grid == tuple(time_grid(15, 3.0))  # a shifted grid is re-made exactly
    for k, name in enumerate(p.branches):
        for j in range(15):
            on = j in q.cached_steps and bool(p.rect_enabled[k, nearest[j]])
            assert bool(q.rect_enabled[k, j]) == on
            if on:
                assert torch.equal(q.rect_a[name][j], p.rect_a[name][nearest[j]])
                assert torch.equal(q.rect_b[name][j], p.rect_b[name][nearest[j]])
    assert_same_policy(q.for_steps(15), q)


def test_timestep_adjustment_factors_are_recovered_and_carried():
    grid = time_grid(10, 3.0)
    adjusted = shrink_step(shrink_step(grid, 3, 0.6), 6, 0.8)
    p = Policy(10, (3, 6), tuple(grid), adjusted_grid=tuple(adjusted), shift=3.0)
    phis = recovered_phis(p)
    assert phis.keys() == {3, 6} and abs(phis[3] - 0.6) < 1e-9 and abs(phis[6] - 0.8) < 1e-9
    q = p.for_steps(19)  # step j of 19 sits at 9j/18 = j/2, halves rounding up: 5, 6 -> 3 and 11, 12 -> 6
    assert q.cached_steps == (5, 6, 11, 12)
    expected = {5: 0.6, 6: 0.6, 11: 0.8, 12: 0.8}
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
