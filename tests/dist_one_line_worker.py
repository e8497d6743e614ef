"""Run by tests/test_one_line.py under torchrun: the one-line mode on 2 processes, each calling with its own row."""

import json
import sys

import torch

from ertacache import apply_ertacache
from ertacache.calibration.distributed import init_from_env, rank_and_size
from ertacache.models.digits import NULL_CLASS, digits_flux_pipeline, load_digits_model

T = 10


def row_kwargs(model, labels):
    labels = torch.tensor(labels)
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))
    return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)


def state(handle):
    return {"cached_steps": list(handle.policy.cached_steps), "calibrations": handle.calibrations,
            "step_reuse": {str(k): v for k, v in handle.policy.step_reuse.items()}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    init_from_env()
    rank, _ = rank_and_size()
    cache_dir, out = sys.argv[1], sys.argv[2]
    model = load_digits_model()
    pipe = digits_flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    result = {}

    def call(handle_steps, labels):
        return pipe(num_inference_steps=handle_steps, output_type="latent",
                    generator=torch.Generator().manual_seed(rank), **row_kwargs(model, labels))

    handle = apply_ertacache(pipe, target_speedup=2.0, cache_dir=f"{cache_dir}/rank{rank}")
    call(T, [3 + rank])  # each process its own row: they calibrate together
    call(T, [7])  # the same setting: no calibration
    result["first"] = state(handle)
    handle.remove()
    handle = apply_ertacache(pipe, target_speedup=2.0, cache_dir=f"{cache_dir}/rank{rank}")  # as a restarted group
    call(T, [5])
    result["again"] = state(handle)
    try:
        call(T + rank, [5])  # the processes' settings differ
        result["different"] = "ran"
    except Exception as exc:  # noqa: BLE001  the error every process must raise alike
        result["different"] = str(exc)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
