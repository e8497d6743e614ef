"""Run by tests/test_scale.py under torchrun: calibrate the bundled model as a FluxPipeline on 2 processes."""

import sys

import torch

from ertacache import CalibrationConfig, calibrate_pipeline
from ertacache.calibration.distributed import init_from_env, rank_and_size
from ertacache.models.digits import NULL_CLASS, digits_flux_pipeline, load_digits_model


def pipe_kwargs(model, n):
    labels = torch.arange(n) % 10
    tokens, pooled = model.prompt_embeds(labels)
    null_tokens, null_pooled = model.prompt_embeds(torch.full((n,), NULL_CLASS))
    return dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)


def calibrate(n=8, batch_size=None):
    model = load_digits_model()
    pipe = digits_flux_pipeline(model)
    return calibrate_pipeline(pipe, None, num_inference_steps=8, target_speedup=2.0, seeds=range(n),
                              config=CalibrationConfig(thresholds=(0.1, 0.3), max_candidates=2, search_candidates=1),
                              batch_size=batch_size, **pipe_kwargs(model, n))


if __name__ == "__main__":
    torch.set_num_threads(1)
    init_from_env()
    policy = calibrate(batch_size=2)
    if rank_and_size()[0] == 0:
        policy.save(sys.argv[1])
