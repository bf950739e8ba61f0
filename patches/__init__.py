"""Version-guarded changes to vLLM, one concern per module.

Each module states the vLLM versions it was written against (`VLLM_VERSIONS`, prefixes) and an
`apply()` that is idempotent. `apply_patches()` refuses to patch an unknown vLLM version rather
than patching blindly.
"""

from __future__ import annotations

from vllm_blockdiff.patches import (
    cpu_async_scheduling,
    cpu_grammar_bitmask,
    cpu_gumbel_sample,
    cpu_seeded_chunks,
    cpu_top_k_top_p,
    cpu_triton_interpreter,
    diffusion_sampling_params,
    diffusion_structured_outputs,
    earliest_stop_string,
    early_validation,
    preempted_block_state,
    proposer_step,
    token_ids,
)

PATCHES = (diffusion_sampling_params, diffusion_structured_outputs, token_ids,
           early_validation, earliest_stop_string, cpu_top_k_top_p, cpu_gumbel_sample,
           cpu_grammar_bitmask, cpu_seeded_chunks, proposer_step, cpu_async_scheduling,
           preempted_block_state, cpu_triton_interpreter)


def apply_patches() -> None:
    import vllm

    for patch in PATCHES:
        if not vllm.__version__.startswith(patch.VLLM_VERSIONS):
            raise RuntimeError(
                f"{patch.__name__} targets vLLM {patch.VLLM_VERSIONS}, found {vllm.__version__}"
            )
        patch.apply()
