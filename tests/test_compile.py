"""torch.compile with the cache applied: decisions stay outside the graph, one compilation per shape.

A counting backend stands for inductor (the same Dynamo capture, no C++ build): it
counts the graphs Dynamo hands over and runs them as captured.
"""

import pytest
import torch

from ertacache import Policy, apply_ertacache
from ertacache.errors import ErtaCacheError
from ertacache.policy import uniform_cached_steps
from test_diffusers_wan import EMB, KW, NEG, T, tiny_pipe


class Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipe(tmp_path_factory.mktemp("wan_compile"))


def call(pipe):
    gens = [torch.Generator().manual_seed(5)]
    return pipe(prompt_embeds=EMB[:1], negative_prompt_embeds=NEG[:1], num_inference_steps=T, output_type="latent",
                generator=gens, **KW).frames


def policy_for(pipe, reuse):
    from ertacache.core.grids import time_grid
    from ertacache.integrations.diffusers.families import family_for, pipeline_fingerprint

    return Policy(T, uniform_cached_steps(T, T // 2), tuple(time_grid(T, 3.0)), reuse=reuse,
                  branches=("cond", "uncond"), model_fingerprint=pipeline_fingerprint(pipe, family_for(pipe)))


def eager_reference(pipe, policy):
    with apply_ertacache(pipe, policy):
        return call(pipe)


@pytest.mark.parametrize("reuse", ["velocity", "block_residual"])
def test_compile_after_apply_whole_model_and_regional(pipe, reuse):
    torch._dynamo.reset()
    policy = policy_for(pipe, reuse)
    ref = eager_reference(pipe, policy)
    kinds = ["regional"] if reuse == "block_residual" else ["whole", "regional"]
    for kind in kinds:
        torch._dynamo.reset()
        backend = Counting()
        with apply_ertacache(pipe, policy) as handle:
            if kind == "whole":
                pipe.transformer.compile(backend=backend, fullgraph=True)
            else:
                pipe.transformer.compile_repeated_blocks(backend=backend, fullgraph=True)
            for _ in range(2):
                out = call(pipe)
                assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # one graph for the one input shape (regional: blocks share it), whatever the step and decision
        assert backend.graphs == 1, (kind, backend.graphs)
        for module in pipe.transformer.modules():  # velocity reuse hooks no block: regional compile was in place
            module._compiled_call_impl = None
    assert "compile" not in pipe.transformer.__dict__  # remove() restores the module's own compile()


def test_wrapped_compile_before_apply(pipe):
    torch._dynamo.reset()
    policy = policy_for(pipe, "velocity")
    ref = eager_reference(pipe, policy)
    backend = Counting()
    plain = pipe.transformer
    pipe.transformer = torch.compile(plain, backend=backend, fullgraph=True)
    try:
        with apply_ertacache(pipe, policy) as handle:  # the fingerprint sees through the _orig_mod. prefix
            out = call(pipe)
            call(pipe)
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert backend.graphs == 1
    finally:
        pipe.transformer = plain


def test_in_place_compile_before_apply_is_refused_with_the_order(pipe):
    policy = policy_for(pipe, "velocity")
    pipe.transformer.compile(backend=Counting())
    try:
        with pytest.raises(ErtaCacheError, match="compiled in place before ertacache was applied.*apply it first"):
            apply_ertacache(pipe, policy)
    finally:
        pipe.transformer._compiled_call_impl = None
