"""Seeded requests on CPU under Model Runner V1 survive a prompt split into chunks.

vLLM 0.26's V1 runner (the runner of AR models with a speculative proposer, and of AR models on
CPU where Triton does not import) samples a token for every request in the batch, also for a
prompt chunk whose token it then discards, and rewinds that request's generator with
`set_offset(get_offset() - 4)` (`GPUModelRunner._bookkeeping_sync`). A CPU `torch.Generator`
has no offset: the first seeded request whose prompt the token budget split killed the engine
("CPU Generator does not use offset"). On CPU this patch rewinds such a generator to its state
before the step instead: the state recorded after the request's last step, or, for a request in its
first step, the state its seed gives. The seeded output is then the same however the prompt is
chunked, as on GPUs. GPU generators keep vLLM's rewind.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)
_STATES = "_blockdiff_generator_states"  # runner attribute: id(gen) -> (gen, state)


def apply() -> None:
    @wrap_once(GPUModelRunner, "_bookkeeping_sync")
    def _bookkeeping_sync(original, self, *args, **kwargs):
        batch = self.input_batch
        generators = batch.generators
        before: dict[int, tuple[torch.Generator, torch.Tensor]] = getattr(self, _STATES, {})
        discarded = np.flatnonzero(self.discard_request_mask.np[:batch.num_reqs])
        held = {int(i): generators.pop(int(i)) for i in discarded
                if int(i) in generators and generators[int(i)].device.type == "cpu"}
        try:
            return original(self, *args, **kwargs)
        finally:
            for i, gen in held.items():
                if id(gen) in before:
                    gen.set_state(before[id(gen)][1])
                else:  # its first step: nothing drawn before this one
                    gen.manual_seed(self.requests[batch.req_ids[i]].sampling_params.seed)
                generators[i] = gen
            # Every live request's generator after this step (a preempted one comes back).
            live = {id(r.generator) for r in self.requests.values() if r.generator is not None}
            states = {k: v for k, v in before.items() if k in live}
            states.update((id(g), (g, g.get_state())) for g in generators.values()
                          if g.device.type == "cpu")
            setattr(self, _STATES, states)
