"""Fast-dLLM v2 executor: vLLM's Qwen2 model (Qwen2.5 layers) on block-causal attention.

Fast-dLLM v2 checkpoints are Qwen2.5 checkpoints (q/k/v biases, tied embeddings at 1.5B) with
`bd_size` and `layer_types` added, so vLLM's Qwen2 layers and weight loading serve them
unchanged. Their logits are shifted: position j is predicted from the hidden state at j - 1, so a
block's first token comes from the previous block's last position, like an AR step
(`ModelFamily.shifted_logits`; the model state and scheduler keep that position in each query).
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vllm_blockdiff.models.sdar import BlockDiffusionExecutor


class FastDLLMQwenForCausalLM(BlockDiffusionExecutor, Qwen2ForCausalLM):
    pass
