"""A block-diffusion engine on CPU keeps `--async-scheduling` when it is asked for.

vLLM 0.26's CPU platform turns asynchronous scheduling off for every model ("not required on
CPU", `CpuPlatform.check_and_update_config`), after the config hook has planned a block-diffusion
serve with windows (`engine/scheduler.py`). Model Runner V2 runs asynchronously on CPU as on GPUs,
so this patch keeps the setting for block-diffusion models whose user asked for it: the CPU build
then runs the same overlapped steps as a GPU server, which is how the tests cover windows with a
step in flight. Other models keep vLLM's choice.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from vllm_blockdiff.options import is_block_diffusion, serve_config_of
from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    @wrap_once(CpuPlatform, "check_and_update_config")
    def check_and_update_config(original, cls, vllm_config) -> None:
        original(cls, vllm_config)
        model = vllm_config.model_config
        if (model is not None and is_block_diffusion(model.hf_config)
                and serve_config_of(model.hf_config).windows):
            vllm_config.scheduler_config.async_scheduling = True
