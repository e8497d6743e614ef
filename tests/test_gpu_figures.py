"""scripts/gpu_figures.py at tiny configs on the CPU: the GPU figures' script cannot rot unseen."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_figures.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_figure(tmp_path):
    from ertacache.policy import uniform_cached_steps

    out = tmp_path / "figures.json"
    # the eager backend: Dynamo captures the compiled blocks under the cache's hooks (fullgraph), no C++ build
    assert load().main(["--tiny", "--steps", "6", "--calibration-steps", "4", "--compile-backend", "eager",
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cached = [i for i in uniform_cached_steps(6, 3) if i >= 1]
    assert set(result["models"]) == {"flux", "wan"}
    for row in result["models"].values():
        assert row["uncached"]["computed"]["steps"] == 5 and "cached" not in row["uncached"]  # steps 1..T-1
        assert row["cached"]["cached"]["steps"] == len(cached)
        assert row["cached"]["computed"]["steps"] == 5 - len(cached)
        assert row["compiled"]["cached"]["steps"] == len(cached)
        assert row["calibration"]["model_calls"] > 0 and row["calibration"]["nfe"] in (2, 3)
    assert result["models"]["wan"]["parameters"] < result["models"]["flux"]["parameters"]
    table = out.with_suffix(".md").read_text()
    assert "FLUX.1-dev" in table and "Wan2.1-1.3B" in table


def test_real_sizes_refused_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        load().main(["--out", str(tmp_path / "x.json")])
    assert "--tiny" in capsys.readouterr().err
