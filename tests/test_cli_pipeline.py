"""``ertacache calibrate|generate --pipeline DIR``: the command line on a tiny Wan pipeline with a text encoder.

The pipeline is complete: a word-level tokenizer trained in the test, a tiny UMT5
text encoder, a tiny transformer and VAE. It is saved with ``save_pretrained`` and the
CLI loads the folder with ``DiffusionPipeline.from_pretrained``, as it would a hub id.
"""

import pytest

from ertacache import Policy
from ertacache.app.cli import main

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from test_diffusers_wan import tiny_transformer

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROMPTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=tiny_transformer(0), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    path = tmp_path_factory.mktemp("wan_cli")
    pipe.save_pretrained(path)
    return path


COMMON = ["--num-inference-steps", "8", "--height", "16", "--width", "16", "--num-frames", "5", "--guidance-scale",
          "4", "--dtype", "float32", "--device", "cpu"]


def test_calibrate_and_generate_with_pipeline(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    policy_path = tmp_path / "wan.safetensors"
    assert main(["calibrate", "--pipeline", str(folder), *COMMON, "--prompts", str(prompts), "--target-speedup", "2",
                 "--out", str(policy_path)]) == 0
    policy = Policy.load(policy_path)
    assert policy.nfe <= 4 and policy.branches == ("cond", "uncond")
    assert policy.provenance["calibration_size"] == 4 and policy.provenance["pipeline"] == "WanPipeline"
    assert main(["generate", "--pipeline", str(folder), *COMMON, "--policy", str(policy_path), "--prompt", "a cat",
                 "--out", str(tmp_path / "video")]) == 0
    video = tmp_path / "video.mp4"
    assert video.is_file() and video.stat().st_size > 0
    assert "computed steps" in capsys.readouterr().out
    assert main(["generate", "--pipeline", str(folder), *COMMON[:-4], "--dtype", "float32", "--device", "cpu",
                 "--guidance-scale", "7", "--policy", str(policy_path), "--prompt", "a cat",
                 "--out", str(tmp_path / "v2")]) == 2
    assert "guidance_scale: policy 4.0, got 7.0" in capsys.readouterr().err


def test_pipeline_cli_errors(folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["calibrate", "--pipeline", str(folder), "--prompts", str(empty), "--target-speedup", "2",
                 "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "calibration set is empty" in capsys.readouterr().err
    assert main(["calibrate", "--pipeline", str(folder), "--target-speedup", "2", "--out", "p.safetensors"]) == 2
    assert "--prompts" in capsys.readouterr().err
    some = tmp_path / "some.txt"
    some.write_text("a cat\n")
    assert main(["calibrate", "--pipeline", str(folder), "--prompts", str(some), "--target-speedup", "2",
                 "--dtype", "float64", "--out", "p.safetensors"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err


def test_generate_checks_everything_before_the_pipeline_loads(folder, tmp_path, capsys, monkeypatch):
    from ertacache.app import pipeline_cli

    policy = Policy.all_compute(8, guidance={"guidance_scale": 4.0})
    policy.save(tmp_path / "p.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)

    def no_load(settings):
        raise AssertionError("the pipeline loaded before the arguments were checked")

    monkeypatch.setattr(pipeline_cli, "load_pipeline", no_load)
    gen = ["generate", "--pipeline", str(folder), *COMMON, "--prompt", "a cat"]
    cases = [
        ([*gen, "--policy", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "vid.png")],
         "this pipeline makes a video; use a .mp4 or .gif file name"),
        ([*gen, "--true-cfg-scale", "2", "--out", str(tmp_path / "v.mp4")], "WanPipeline takes no --true-cfg-scale"),
        ([*gen, "--policy", str(bad), "--out", str(tmp_path / "v.mp4")], "is not a readable safetensors file"),
        ([*gen, "--policy", str(tmp_path / "p.safetensors"), "--guidance-scale", "5", "--out", str(tmp_path / "v.mp4")],
         "guidance_scale: policy 4.0, got 5.0"),
        (["generate", "--pipeline", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "v.mp4")],
         "no pipeline folder at"),
        (["calibrate", "--pipeline", str(folder), "--prompts", str(tmp_path / "none.txt"), "--target-speedup", "2",
          "--out", str(tmp_path / "p2.safetensors")], "no prompts file at"),
        (["calibrate", "--pipeline", str(folder), "--target-speedup", "2", "--out", str(tmp_path / "p.json")],
         "--prompts"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_negative_prompt_and_max_sequence_length_reach_the_pipeline(folder, tmp_path, capsys, monkeypatch):
    from diffusers import WanPipeline

    seen = {}
    original = WanPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", spy)
    assert main(["generate", "--pipeline", str(folder), *COMMON, "--prompt", "a cat", "--negative-prompt", "a cube",
                 "--max-sequence-length", "16", "--out", str(tmp_path / "v.gif")]) == 0
    assert seen["negative_prompt"] == "a cube" and seen["max_sequence_length"] == 16
    assert (tmp_path / "v.gif").is_file()


def test_bench_on_a_pipeline(folder, tmp_path):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    docs = tmp_path / "docs"
    assert main(["bench", "--pipeline", str(folder), "--prompts", str(prompts), "--quick", *COMMON,
                 "--docs", str(docs), "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    methods = {r["method"] for r in rows}
    assert {"none", "uniform", "ertacache", "first_block_cache", "magcache"} <= methods
    by = {(r["method"], r["setting"]): r for r in rows}
    assert by[("none", "uncached")]["nfe"] == 8 and by[("none", "uncached")]["psnr"] is None
    ertacache = [r for r in rows if r["method"] == "ertacache"]
    assert all(r["nfe"] <= 8 / 1.5 for r in ertacache)
    for name in ("results.md", "results.json", "psnr_vs_speedup.png", "grid_2x.png"):
        assert (docs / name).is_file()
    assert "TeaCache: not on pipelines" in (docs / "results.md").read_text()
    from ertacache import __version__

    header = json.loads((docs / "results.json").read_text())["header"]  # what made the figures: version, commit
    assert header["source"].startswith(f"ertacache {__version__}") and "(commit " in header["source"]


@pytest.mark.parametrize("error", ["OutOfMemoryError", "MemoryError", "cpu"])
def test_out_of_memory_is_one_line_that_names_the_size_flags(folder, tmp_path, capsys, monkeypatch, error):
    """A pipeline at its default size (Wan: 480x832, 81 frames) can exhaust memory: one line says what to pass."""
    import torch

    from ertacache.app import pipeline_cli

    def exhaust(settings):
        if error == "cpu":  # what the CPU allocator raises (torch.empty(10**13) here): a plain RuntimeError
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 40000000000000 bytes. Error code 12")
        raise (torch.OutOfMemoryError if error == "OutOfMemoryError" else MemoryError)("CUDA out of memory")

    monkeypatch.setattr(pipeline_cli, "calibrate", exhaust)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    assert main(["calibrate", "--pipeline", str(folder), "--prompts", str(prompts), "--target-speedup", "2",
                 "--device", "cpu", "--out", str(tmp_path / "p.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory on cpu" in err and "--height/--width/--num-frames" in err
    monkeypatch.setattr(pipeline_cli, "calibrate", lambda settings: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors keep their traceback
        main(["calibrate", "--pipeline", str(folder), "--prompts", str(prompts), "--target-speedup", "2",
              "--device", "cpu", "--out", str(tmp_path / "p.safetensors")])


def test_a_size_the_pipeline_cannot_run_is_one_line(folder, tmp_path, capsys, monkeypatch):
    """At its default size (480x832, 81 frames) the tiny Wan transformer's rotary table is too short: the
    pipeline's own code raises, and the CLI says so in one line naming the size and the flags (was a traceback)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = ["calibrate", "--pipeline", str(folder), "--prompts", str(prompts), "--target-speedup", "2",
            "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "p.safetensors")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ertacache: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "the pipeline's own call failed at its default size (RuntimeError:" in lines[0]
    assert "--height/--width/--num-frames" in lines[0]
    monkeypatch.setenv("ERTACACHE_TRACEBACK", "1")  # the traceback, on request
    with pytest.raises(RuntimeError):
        main(argv)
    assert not (tmp_path / "p.safetensors").exists()


def test_generate_with_a_target_calibrates_once_and_keeps_the_policy(folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    gen = ["generate", "--pipeline", str(folder), *COMMON, "--target-speedup", "2", "--cache-dir", str(cache),
           "--prompt", "a cat"]
    assert main([*gen, "--out", str(tmp_path / "a")]) == 0
    (path,) = cache.glob("*.safetensors")
    written = path.stat().st_mtime_ns
    assert main([*gen, "--out", str(tmp_path / "b")]) == 0  # the same settings: the kept policy, no calibration
    assert path.stat().st_mtime_ns == written and (tmp_path / "b.mp4").is_file()
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "1 policies in" in out and "WanPipeline, T = 8, NFE" in out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0 and not list(cache.glob("*.safetensors"))
    assert main([*gen, "--policy", "x.safetensors", "--out", str(tmp_path / "c")]) == 2
    assert "use it with --pipeline and without --policy" in capsys.readouterr().err


def test_check_prompts_reach_the_calibration(folder, tmp_path, capsys, monkeypatch):
    from ertacache.app import pipeline_cli
    from ertacache.integrations.diffusers import calibrate

    prompts, check = tmp_path / "prompts.txt", tmp_path / "check.txt"
    prompts.write_text("a red cube\n")
    check.write_text("a cat\n\na green cone\n")
    seen = {}

    def calibrating(pipe, rows, **kw):
        seen.update(kw, rows=rows)
        return Policy.uniform(8, 4)

    monkeypatch.setattr(calibrate, "calibrate_pipeline", calibrating)
    monkeypatch.setattr(pipeline_cli, "write_policy", lambda policy, out: 0)
    assert main(["calibrate", "--pipeline", str(folder), *COMMON, "--prompts", str(prompts), "--check-prompts",
                 str(check), "--target-speedup", "2", "--out", str(tmp_path / "p.safetensors")]) == 0
    assert seen["rows"] == ["a red cube"] and seen["check_prompts"] == ("a cat", "a green cone")
    assert main(["calibrate", "--model", "digits", "--check-prompts", str(check), "--target-speedup", "2",
                 "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "--check-prompts FILE comes with them" in capsys.readouterr().err
