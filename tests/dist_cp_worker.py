"""Worker for tests/test_parallel.py: context parallelism (Ulysses, gloo on CPU) with the cache applied before
and after ``enable_parallelism``; writes what each rank ran and how far it is from the single-process output."""

import json
import sys

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from ertacache import Policy, apply_ertacache, model_fingerprint, seeded_noise
from ertacache.models.digits import NULL_CLASS, digits_flux_pipeline, load_digits_model, pack, unpack

T = 10


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.accelerator.device_count = lambda: 1  # a CPU process: diffusers places rank r on device r % count
    labels, noise = torch.tensor([3, 7]), seeded_noise([1, 2], (1, 16, 16))
    results = []
    for reuse in ("velocity", "block_residual"):
        for order in ("after", "before"):
            model = load_digits_model()
            pipe = digits_flux_pipeline(model)
            pipe.set_progress_bar_config(disable=True)
            tokens, pooled = model.prompt_embeds(labels)
            null_tokens, null_pooled = model.prompt_embeds(torch.full_like(labels, NULL_CLASS))

            call = dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                        negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, latents=pack(noise),
                        num_inference_steps=T, height=16, width=16, output_type="latent")

            def run(pipe=pipe, call=call):
                return unpack(pipe(**call).images)

            policy = Policy.uniform(T, T // 2, reuse=reuse, branches=("cond", "uncond"), latent_shape=(64, 4),
                                    model_fingerprint=model_fingerprint(model.transformer))
            with apply_ertacache(pipe, policy):
                single = run()  # one process, no parallelism
            config = ContextParallelConfig(ulysses_degree=2)
            if order == "after":
                pipe.transformer.enable_parallelism(config=config)
                handle = apply_ertacache(pipe, policy)
            else:
                handle = apply_ertacache(pipe, policy)
                pipe.transformer.enable_parallelism(config=config)
            out = run()
            results.append({"reuse": reuse, "order": order, "steps": handle.steps(), "forwards": handle.forwards(),
                            "max_abs_diff": float((out - single).abs().max()), "nfe": policy.nfe})
            handle.remove()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
