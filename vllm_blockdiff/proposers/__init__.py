"""Training-free speculative proposers for AR models, one module per paper.

Selected through vLLM's own speculative config, nothing else:

    LLM(model, speculative_config={"method": "custom_class",
                                   "model": "vllm_blockdiff.proposers.aded.ADEDProposer",
                                   "num_speculative_tokens": 4})
    vllm serve MODEL --speculative-config '{"method": "custom_class",
        "model": "vllm_blockdiff.proposers.token_recycling.TokenRecyclingProposer",
        "num_speculative_tokens": 4}'

(`"model"` alone, a dotted path, also selects `custom_class`.) The classes:
`token_recycling.TokenRecyclingProposer`, `aded.ADEDProposer`, `input_copy.InputCopyProposer`.

What vLLM 0.26 gives a `custom_class` proposer: it runs on Model Runner V1 only (vLLM picks V1
for such a config; V2 has no proposer hook) with asynchronous scheduling off; the class is built
as `cls(vllm_config)` in each worker; `load_model(target_model)` is called once; after every step
`propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)` gets the
tokens each request verified that step and the batch's token history, and returns a list of
drafts, one per request, each at most `num_speculative_tokens` long (shorter or empty is fine).
vLLM verifies each draft as a chain with its rejection sampler, which treats such drafts as
deterministic (draft probability one): greedy output is unchanged and sampled output keeps its
distribution. Structured outputs trim drafts the grammar refuses before they are scheduled.

`speculative_config` refuses unknown keys and sets `prompt_lookup_*` to 0 for `custom_class`, so
it carries nothing but the class and the draft length. A proposer's own options go in vLLM's
`additional_config` under "proposer", checked against its `Options` (unknown keys are refused):

    vllm serve MODEL --speculative-config '{...ADEDProposer...}' \\
        --additional-config '{"proposer": {"min_prob": 0.2}}'

Token Recycling (the target's top-k) and the input copy (request ids, prompt lengths) need what
`propose` is not given; the plugin's patch `patches/proposer_step.py` hands it to them.
"""
