"""Model Runner V2 tells the model state which of the requests it removes were preempted.

vLLM 0.26's `GPUModelRunner.finish_requests` removes finished and preempted requests alike
(`ModelState.remove_request(req_id)`), and a resumed request comes back with its prompt and
emitted tokens only. A block-diffusion request preempted in the middle of a block also has
positions committed after a gap in its emitted text, and the step count and confidences its
policy reads; without them the resumed request decodes differently than it would have without
the preemption (found on the GPU, where the preemption test's requests are preempted mid-block).
With this patch, a model state that has `track_preemptions(preempted, finished)` hears, before
the requests are removed, the slots of the preempted ones (by request id, from the runner's
`req_states`) and the ids of the finished ones (`engine/model_state.py` keeps a preempted
request's block state until it resumes or finishes).
"""

from __future__ import annotations

from vllm.v1.worker.gpu.model_runner import GPUModelRunner

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def apply() -> None:
    @wrap_once(GPUModelRunner, "finish_requests")
    def finish_requests(original, self, scheduler_output) -> None:
        track = getattr(self.model_state, "track_preemptions", None)
        if track is not None:
            slots = self.req_states.req_id_to_index
            preempted = scheduler_output.preempted_req_ids or ()
            track({r: slots[r] for r in preempted if r in slots},
                  scheduler_output.finished_req_ids)
        original(self, scheduler_output)
