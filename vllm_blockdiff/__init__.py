"""vllm-blockdiff."""
