import json
import subprocess
import sys

import pytest

from ertacache import Policy
from ertacache.app.cli import main


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "policy.safetensors"
    # the search alone with extrapolation (the default config's sources are tested in test_calibration.py;
    # here the command line's flags and files, at a quarter of the default calibration's cost)
    code = main(["calibrate", "--num-inference-steps", "10", "--target-speedup", "2", "--calibration-per-class", "1",
                 "--candidates", "search", "--reuse", "extrapolate", "--out", str(path)])
    assert code == 0
    return path


def test_calibrate_writes_a_loadable_policy(policy_path):
    policy = Policy.load(policy_path)
    assert policy.num_inference_steps == 10 and policy.nfe <= 5
    assert policy.model_fingerprint is not None and policy.latent_shape == (1, 16, 16)


def test_inspect(policy_path, capsys):
    assert main(["inspect", str(policy_path)]) == 0
    assert "NFE=" in capsys.readouterr().out


def test_generate_with_policy(policy_path, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert main(["generate", "--num-inference-steps", "10", "--policy", str(policy_path), "--digit", "3",
                 "--digit", "5", "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    assert "NFE {'cond': " in capsys.readouterr().out


def test_generate_with_other_step_count_is_refused(policy_path, tmp_path, capsys):
    code = main(["generate", "--num-inference-steps", "20", "--policy", str(policy_path),
                 "--out", str(tmp_path / "g.png")])
    assert code == 2
    assert "num_inference_steps: policy 10, got 20" in capsys.readouterr().err


def test_corrupted_policy_is_a_clear_cli_error(policy_path, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(policy_path.read_bytes()[:50])
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ertacache: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_calibrate_rejects_bad_threshold(tmp_path, capsys):
    assert main(["calibrate", "--threshold", "-1", "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "threshold lambda" in capsys.readouterr().err


def test_python_dash_m_works(policy_path):
    done = subprocess.run([sys.executable, "-m", "ertacache", "inspect", str(policy_path)], capture_output=True,
                          text=True, check=True)
    assert "cached steps" in done.stdout
    from safetensors import safe_open

    with safe_open(str(policy_path), "pt") as f:
        assert json.loads(f.metadata()["ertacache.policy"])["format"] == "ertacache.policy"


def test_pipeline_errors_are_one_line_before_anything_loads(tmp_path, capsys):
    missing = str(tmp_path / "no-such-pipeline")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    cases = [
        (["calibrate", "--pipeline", missing, "--prompts", str(tmp_path / "none.txt"), "--target-speedup", "2",
          "--out", str(tmp_path / "p.safetensors")], "no prompts file at"),
        (["calibrate", "--pipeline", missing, "--prompts", str(prompts), "--target-speedup", "2",
          "--out", str(tmp_path / "p.safetensors")], "no pipeline folder at"),
        (["calibrate", "--target-speedup", "2", "--batch-size", "0", "--out", str(tmp_path / "p.safetensors")],
         "batch_size must be an int >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import ertacache.app.cli as cli

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_calibrate", interrupted)
    assert main(["calibrate", "--target-speedup", "2", "--out", "p.safetensors"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("\nertacache: interrupted") and err.count("\n") == 2  # on its own line, after a bar


def test_calibrate_with_the_search_alone_and_extrapolation(policy_path, tmp_path):
    policy = Policy.load(policy_path)
    assert policy.reuse == "extrapolate" and policy.provenance["selected"] == "search" and policy.nfe == 5
    assert policy.config.step_reuse_choice and policy.config.candidates == ("search",)
    path = tmp_path / "search.safetensors"
    assert main(["calibrate", "--num-inference-steps", "10", "--target-speedup", "2", "--calibration-per-class", "1",
                 "--candidates", "search", "--no-step-reuse-choice", "--out", str(path)]) == 0
    policy = Policy.load(path)
    assert not policy.config.step_reuse_choice and not policy.step_reuse
    assert all("step_reuse" not in c for c in policy.provenance["candidates"])


def test_calibrate_rejects_unknown_candidate_sources(tmp_path, capsys):
    assert main(["calibrate", "--target-speedup", "2", "--candidates", "threshold,greedy",
                 "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "candidates must be" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["calibrate", "--num-inference-steps", "10", "--target-speedup", "2", "--calibration-per-class", "1",
                 "--out", str(out), "--dry-run"]) == 0
    default = capsys.readouterr().out
    assert not out.exists()
    assert "10 calibration samples" in default and "ground truth: 1 pass" in default
    assert "estimated wall time" in default and "one model call (one row)" in default
    assert main(["calibrate", "--num-inference-steps", "10", "--target-speedup", "2", "--calibration-per-class", "1",
                 "--out", str(out), "--dry-run", "--thorough"]) == 0
    thorough = capsys.readouterr().out

    def calls(text):
        return int(text.split(" model calls")[0].split()[-1])

    assert calls(thorough) > 3 * calls(default) and not out.exists()


def test_thorough_and_component_flags_build_the_config():
    from ertacache.app.cli import _build_parser, calibrate_settings

    def config(*flags):
        args = _build_parser().parse_args(["calibrate", "--target-speedup", "2", "--out", "p.safetensors", *flags])
        return calibrate_settings(args).config

    assert config().candidates == ("search", "uniform") and not config().timestep_adjustment
    assert config("--thorough").candidates == ("threshold", "uniform", "search")
    assert config("--thorough").timestep_adjustment
    assert not config("--thorough", "--no-timestep-adjustment").timestep_adjustment
    assert config("--timestep-adjustment").timestep_adjustment
    assert not config("--no-step-reuse-choice").step_reuse_choice
    assert config().fresh_check and not config("--no-fresh-check").fresh_check
    assert config("--candidates", "search").candidates == ("search",)


def test_model_takes_a_bundled_name_with_its_sampler(tmp_path, capsys):
    """`--model` names a bundled model as in demo and bench (it was read as a weights file name); its family's
    sampler is the default (moving-digits: T = 50, 16 classes for photos)."""
    assert main(["calibrate", "--model", "moving-digits", "--target-speedup", "2", "--out",
                 str(tmp_path / "p.safetensors"), "--dry-run"]) == 0
    assert "20 calibration samples, T = 50" in capsys.readouterr().out
    out = tmp_path / "clips.png"
    assert main(["generate", "--model", "moving-digits", "--num-inference-steps", "4", "--digit", "3",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["generate", "--model", "photos", "--num-inference-steps", "4", "--digit", "16",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "classes 0-15" in capsys.readouterr().err


def test_an_offline_hub_id_and_a_folder_that_is_not_a_pipeline_are_said_plainly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--pipeline"]
    assert main([*argv, "someone/not-in-the-cache"]) == 2
    err = capsys.readouterr().err
    assert "not in the hub cache, and the hub is off (HF_HUB_OFFLINE=1)" in err
    assert "local_dir_use_symlinks" not in err and len(err.strip().splitlines()) == 1
    assert main([*argv, str(tmp_path)]) == 2
    assert f"the folder {tmp_path} is not a diffusers pipeline (no model_index.json)" in capsys.readouterr().err


def test_reuse_modes_are_one_list():
    """The registry of reuse modes is the one list: the config and the command line's choices follow it."""
    from ertacache import CalibrationConfig
    from ertacache.app.cli import _build_parser
    from ertacache.core.reuse import REUSE_MODES
    from ertacache.errors import ErtaCacheError

    calibrate = _build_parser()._subparsers._group_actions[0].choices["calibrate"]
    choices = next(a.choices for a in calibrate._actions if a.dest == "reuse")
    assert set(choices) == set(REUSE_MODES) == {"velocity", "extrapolate", "latent_residual", "block_residual"}
    for name in REUSE_MODES:
        assert CalibrationConfig(reuse=name).reuse == name
    with pytest.raises(ErtaCacheError, match=r"reuse must be one of \['block_residual'"):
        CalibrationConfig(reuse="hidden")


@pytest.mark.parametrize("model, samples", [("digits", 10), ("moving-digits", 20), ("photos", 16)])
def test_calibration_size_defaults_to_the_models_measured_need(model, samples, tmp_path, capsys):
    """Video models calibrate on about 20 clips by default (10 could not resolve a searched set's gain; N-curve)."""
    assert main(["calibrate", "--model", model, "--target-speedup", "2", "--out", str(tmp_path / "p.safetensors"),
                 "--dry-run"]) == 0
    assert f"{samples} calibration samples" in capsys.readouterr().out
    assert main(["calibrate", "--model", model, "--target-speedup", "2", "--calibration-per-class", "0",
                 "--out", str(tmp_path / "p.safetensors"), "--dry-run"]) == 2
    assert "--calibration-per-class must be a whole number >= 1, got 0" in capsys.readouterr().err
