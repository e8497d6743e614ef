import json

from ertacache.demo import DemoSettings, run_demo


def test_demo_writes_rows_for_every_method(tmp_path):
    settings = DemoSettings(num_inference_steps=12, calibration_per_class=1, heldout_per_class=1, repeats=1)
    rows = run_demo(tmp_path, settings, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc == rows
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["none", "uniform", "offline_policy"] and methods[-1] == "ertacache"
    by = {r["method"]: r for r in rows}
    assert by["none"]["nfe"] == 12 and by["none"]["psnr"] is None and by["none"]["speedup"] == 1.0
    assert by["ertacache"]["nfe"] <= 6 and by["uniform"]["nfe"] == by["ertacache"]["nfe"]
    for r in rows:
        assert {"method", "nfe", "seconds", "speedup", "psnr", "ssim"} <= set(r)
        assert 0 < r["ssim"] <= 1
    for name in ("grid.png", "policy.safetensors", "run.json", "results.md"):
        assert (tmp_path / name).is_file()
