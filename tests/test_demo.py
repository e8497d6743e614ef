import json

from ertacache import Policy
from ertacache.app.demo import DemoSettings, run_demo


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
    assert by["none"]["ssim"] == 1.0 and all(r["psnr"] > 20 for r in rows[1:])  # the same seeds, a close copy
    # the policy file is the one the ertacache row ran; the table and the grid show every row
    policy = Policy.load(tmp_path / "policy.safetensors")
    assert policy.nfe == by["ertacache"]["nfe"] and policy.num_inference_steps == 12
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {r['method']} | {r['nfe']} |" in table for r in rows)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["num_inference_steps"] == 12
