"""``ertacache calibrate|generate --pipeline``: the command line on a tiny Wan pipeline.

The pipeline has no text encoder; a subclass turns each prompt into seeded embeddings
(a stand-in for a text encoder), and the CLI's loader is pointed at it.
"""

import zlib

import pytest
import torch

from ertacache import Policy
from ertacache.cli import main


def make_pipeline_class():
    from diffusers import WanPipeline

    class TextWanPipeline(WanPipeline):
        def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True,
                          num_videos_per_prompt=1, prompt_embeds=None, negative_prompt_embeds=None,
                          max_sequence_length=226, device=None, dtype=None):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            embeds = torch.stack([torch.randn(8, 16, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                                  for p in prompts])
            return embeds, torch.zeros_like(embeds)

    return TextWanPipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from test_diffusers_wan import tiny_pipe

    path = tmp_path_factory.mktemp("wan_cli")
    tiny_pipe(path)
    return path


@pytest.fixture
def cli_loader(folder, monkeypatch):
    cls = make_pipeline_class()

    def load(id_or_dir, dtype, device):
        assert id_or_dir == str(folder) and dtype == "float32" and device == "cpu"
        pipe = cls.from_pretrained(id_or_dir, tokenizer=None, text_encoder=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    monkeypatch.setattr("ertacache.integrations.diffusers.cli.load_pipeline", load)


def test_calibrate_and_generate_with_pipeline(folder, cli_loader, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n\na green cone\na cat\n")
    common = ["--pipeline", str(folder), "--num-inference-steps", "8", "--height", "16", "--width", "16",
              "--num-frames", "5", "--guidance-scale", "4", "--dtype", "float32", "--device", "cpu"]
    policy_path = tmp_path / "wan.json"
    assert main(["calibrate", *common, "--prompts", str(prompts), "--target-speedup", "2",
                 "--out", str(policy_path)]) == 0
    policy = Policy.load(policy_path)
    assert policy.nfe <= 4 and policy.branches == ("cond", "uncond")
    assert policy.provenance["calibration_size"] == 4 and policy.provenance["pipeline"] == "TextWanPipeline"
    assert main(["generate", *common, "--policy", str(policy_path), "--prompt", "a cat",
                 "--out", str(tmp_path / "video")]) == 0
    video = tmp_path / "video.mp4"
    assert video.is_file() and video.stat().st_size > 0
    assert "computed steps" in capsys.readouterr().out


def test_pipeline_cli_errors(folder, cli_loader, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["calibrate", "--pipeline", str(folder), "--prompts", str(empty), "--target-speedup", "2",
                 "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "p.json")]) == 2
    assert "calibration set is empty" in capsys.readouterr().err
    assert main(["calibrate", "--pipeline", str(folder), "--target-speedup", "2", "--out", "p.json"]) == 2
    assert "--prompts" in capsys.readouterr().err
