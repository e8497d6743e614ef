"""FLUX.1-dev's and Wan2.1-1.3B's transformers at their real sizes: what a cached step costs on a GPU.

Builds each transformer from its published config with random bf16 weights (no download:
the figures are about time and memory, which do not depend on the weights) inside its
diffusers pipeline (no text encoder, no VAE: random ``prompt_embeds`` of the real shape,
``output_type="latent"``), at the size users run it (FLUX: 1024x1024, guidance-distilled,
one branch; Wan: 480x832, 81 frames, CFG 5, two branches), and measures:

- a computed step and a cached step (``Policy.uniform`` at half the steps, ``extrapolate``
  reuse, applied with :func:`ertacache.apply_ertacache`): wall time per denoising step,
  from events recorded at each step's end (CUDA events on a GPU: no added sync);
- host-device syncs per step (``torch.cuda.set_sync_debug_mode("warn")``: each
  synchronizing CUDA call warns once), uncached and cached, so what the cache adds shows;
- peak memory of the uncached and the cached call, and of calibration
  (:func:`~ertacache.integrations.diffusers.calibrate.calibrate_pipeline`, micro-batch 1,
  2 prompts, the default configuration, target 2x);
- a computed step through ``torch.compile`` (the repeated blocks compiled, the cache applied).

Writes one JSON (``--out``) and a Markdown table beside it (``.md``).

    python scripts/gpu_figures.py --out docs/gpu_figures.json         # a CUDA GPU, real sizes
    python scripts/gpu_figures.py --tiny --out /tmp/gpu_figures.json  # CPU, tiny configs (make test)

All weights are bf16 (the published Wan pipeline keeps a few small modules, such as
norms and the time embedding, in float32: a negligible share of a step's time).
Sizes: FLUX.1-dev about 24 GB of bf16 weights, Wan2.1-1.3B about 3 GB; an 80 GB GPU holds
either. ``--steps`` (default 10) is T of the timing runs and ``--calibration-steps``
(default 8) T of the calibration run: step times and peak memory do not depend on T beyond
the per-step statistics calibration keeps (listed in the JSON), and these keep the script
inside a few minutes per model on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ertacache import Policy, apply_ertacache
from ertacache.core.config import CalibrationConfig
from ertacache.integrations.diffusers.calibrate import calibrate_pipeline
from ertacache.io import atomic_write_text

# Published configs: black-forest-labs/FLUX.1-dev transformer/config.json and
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FLUX_TINY = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=32,
                num_layers=1, rope_max_seq_len=32)

# The call each model is run with. The pipelines have no VAE: FLUX's pass-through VAE has
# vae_scale_factor 1, so height=128 is the 128x128 latent of a 1024x1024 image; Wan without a
# VAE assumes its own 4x temporal and 8x spatial compression, so the pixel size is passed.
CALLS = {
    "flux": dict(real=dict(height=128, width=128, guidance_scale=3.5),
                 tiny=dict(height=16, width=16, guidance_scale=3.5),
                 text=(512, 4096, 768), tiny_text=(8, 32, 32), shift=3.0, label="FLUX.1-dev, 1024x1024"),
    "wan": dict(real=dict(height=480, width=832, num_frames=81, guidance_scale=5.0),
                tiny=dict(height=32, width=32, num_frames=5, guidance_scale=5.0),
                text=(512, 4096, None), tiny_text=(8, 32, None), shift=5.0, label="Wan2.1-1.3B, 480x832, 81 frames"),
}


def build(name: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """The pipeline with its transformer at ``name``'s config (random weights, seed 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=CALLS[name]["shift"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # weights made in bf16 on the device: FLUX.1-dev never exists in float32
    try:
        with device:
            return _build(name, tiny, scheduler, device, dtype)
    finally:
        torch.set_default_dtype(default)


def _build(name: str, tiny: bool, scheduler: Any, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, WanPipeline, WanTransformer3DModel

    if name == "flux":
        transformer = FluxTransformer2DModel(**(FLUX_TINY if tiny else FLUX_DEV))
        vae = AutoencoderKL(in_channels=16, out_channels=16, latent_channels=16, block_out_channels=(4,),
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            layers_per_block=1, norm_num_groups=1)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
    else:
        transformer = WanTransformer3DModel(**(WAN_TINY if tiny else WAN_1_3B))
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def embeds(name: str, tiny: bool, rows: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random text conditions of the real shape (``rows`` prompts)."""
    seq, dim, pooled = CALLS[name]["tiny_text" if tiny else "text"]
    g = torch.Generator().manual_seed(1)
    out = {"prompt_embeds": torch.randn(rows, seq, dim, generator=g)}
    if pooled is not None:
        out["pooled_prompt_embeds"] = torch.randn(rows, pooled, generator=g)
    else:
        out["negative_prompt_embeds"] = torch.randn(rows, seq, dim, generator=g)
    return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}


class StepClock:
    """Marks each denoising step's end (``callback_on_step_end``) with a time and the syncs so far.

    On CUDA the marks are events (recording one does not synchronize); the syncs are the
    warnings ``torch.cuda.set_sync_debug_mode("warn")`` raised so far.
    """

    def __init__(self, device: torch.device, caught: list[Any]) -> None:
        self.cuda = device.type == "cuda"
        self.caught = caught
        self.marks: list[Any] = []
        self.syncs: list[int] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        self.syncs.append(sum("synchroniz" in str(w.message) for w in self.caught))

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.mark()
        return {}

    def steps(self) -> tuple[list[float], list[int]]:
        """Seconds and syncs of steps 1..T-1 (step 0 also holds the call's set-up)."""
        if self.cuda:
            torch.cuda.synchronize()
            seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks[:-1], self.marks[1:])]
        else:
            seconds = [b - a for a, b in zip(self.marks[:-1], self.marks[1:])]
        syncs = [b - a for a, b in zip(self.syncs[:-1], self.syncs[1:])]
        return seconds, syncs


def timed_call(pipe: Any, name: str, tiny: bool, steps: int, device: torch.device, dtype: torch.dtype,
               policy: Policy | None) -> dict[str, Any]:
    """One call at T = ``steps``; per-step seconds and syncs split by computed and cached step."""
    kwargs = dict(CALLS[name]["tiny" if tiny else "real"], **embeds(name, tiny, 1, device, dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clock = StepClock(device, caught)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            clock.mark()
            pipe(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                 callback_on_step_end=clock, **kwargs)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    seconds, syncs = clock.steps()
    cached = set(policy.cached_steps) if policy is not None else set()
    split: dict[str, dict[str, float]] = {}
    for kind, keep in (("computed", lambda i: i not in cached), ("cached", lambda i: i in cached)):
        idx = [i for i in range(1, steps) if keep(i)]
        if idx:
            split[kind] = {"steps": len(idx), "seconds_per_step": sum(seconds[i] for i in idx) / len(idx),
                           "syncs_per_step": sum(syncs[i] for i in idx) / len(idx)}
    out: dict[str, Any] = {"steps": steps, **split}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def calibration_memory(pipe: Any, name: str, tiny: bool, steps: int, device: torch.device,
                       dtype: torch.dtype) -> dict[str, Any]:
    """Peak memory and seconds of the default calibration (2 prompts, micro-batch 1, target 2x)."""
    kwargs = dict(CALLS[name]["tiny" if tiny else "real"], **embeds(name, tiny, 2, device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    policy = calibrate_pipeline(pipe, None, num_inference_steps=steps, target_speedup=2.0, config=CalibrationConfig(),
                                batch_size=1, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"steps": steps, "prompts": 2, "micro_batch": 1, "seconds": time.perf_counter() - start,
           "model_calls": policy.provenance.get("cost", {}).get("model_calls"), "nfe": policy.nfe}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def measure(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    pipe = build(name, args.tiny, device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"[gpu_figures] {name}: {params / 1e9:.2f} B parameters on {device}", flush=True)
    policy = Policy.uniform(args.steps, args.steps // 2, reuse="extrapolate")
    row: dict[str, Any] = {"label": CALLS[name]["label"] + (" (tiny config)" if args.tiny else ""),
                           "parameters": params, "call": CALLS[name]["tiny" if args.tiny else "real"]}
    timed_call(pipe, name, args.tiny, 2, device, dtype, None)  # warm-up (kernels, allocator)
    row["uncached"] = timed_call(pipe, name, args.tiny, args.steps, device, dtype, None)
    with apply_ertacache(pipe, policy):
        row["cached"] = timed_call(pipe, name, args.tiny, args.steps, device, dtype, policy)
    row["calibration"] = calibration_memory(pipe, name, args.tiny, args.calibration_steps, device, dtype)
    if not args.no_compile:
        torch._dynamo.reset()
        with apply_ertacache(pipe, policy):
            pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend)
            start = time.perf_counter()
            timed_call(pipe, name, args.tiny, args.steps, device, dtype, policy)  # compiles
            compile_seconds = time.perf_counter() - start
            row["compiled"] = timed_call(pipe, name, args.tiny, args.steps, device, dtype, policy)
            row["compiled"]["compile_seconds"] = compile_seconds
            row["compiled"]["backend"] = args.compile_backend
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(result: dict[str, Any]) -> str:
    def ms(part: dict[str, Any] | None, kind: str) -> str:
        return f"{1e3 * part[kind]['seconds_per_step']:.1f}" if part and kind in part else "-"

    def syncs(part: dict[str, Any] | None, kind: str) -> str:
        return f"{part[kind]['syncs_per_step']:.1f}" if part and kind in part else "-"

    def gib(part: dict[str, Any] | None) -> str:
        return f"{part['peak_memory_gib']:.1f}" if part and "peak_memory_gib" in part else "-"

    lines = [f"device: {result['device']}; torch {result['torch']}, diffusers {result['diffusers']}; "
             f"T = {result['steps']} (timing), {result['calibration_steps']} (calibration)", "",
             "| model | uncached step (ms) | computed step, cached run (ms) | cached step (ms) "
             "| compiled computed step (ms) | syncs per uncached step | syncs per cached step "
             "| peak memory uncached / cached / calibration (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["models"].values():
        lines.append(f"| {row['label']} | {ms(row['uncached'], 'computed')} | {ms(row['cached'], 'computed')} "
                     f"| {ms(row['cached'], 'cached')} | {ms(row.get('compiled'), 'computed')} "
                     f"| {syncs(row['uncached'], 'computed')} | {syncs(row['cached'], 'cached')} "
                     f"| {gib(row['uncached'])} / {gib(row['cached'])} / {gib(row['calibration'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import diffusers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON; the table goes beside it (.md)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (runs on a CPU in seconds; what make test runs)")
    p.add_argument("--models", default="flux,wan", help="comma-separated: flux, wan")
    p.add_argument("--steps", type=int, default=10, help="T of the timing runs (default 10)")
    p.add_argument("--calibration-steps", type=int, default=8, help="T of the calibration run (default 8)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CALLS]
    if unknown or not names:
        p.error(f"--models takes a comma-separated subset of {sorted(CALLS)}; got {args.models!r}")
    if args.steps < 4 or args.calibration_steps < 4:
        p.error(f"--steps and --calibration-steps must be at least 4; got {args.steps}, {args.calibration_steps}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        p.error("no CUDA device: the real sizes need a GPU (FLUX.1-dev's transformer alone is 24 GB); "
                "run with --tiny to check the script on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    result: dict[str, Any] = {
        "command": "python scripts/gpu_figures.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "steps": args.steps,
        "calibration_steps": args.calibration_steps, "models": {}}
    for name in names:
        result["models"][name] = measure(name, args, device, dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), table(result))
    print(table(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
