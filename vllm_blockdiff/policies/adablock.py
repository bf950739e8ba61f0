"""AdaBlock: the threshold rule, confined to a semantic window that ends at a predicted delimiter.

Paper rule (AdaBlock-dLLM `compute_block_length`, for LLaDA/Dream: full-attention models decoded
semi-autoregressively): at each block start, among the argmax proposals of a window after it, find
the delimiter tokens (newline by default); if the most confident one has confidence >=
`delimiter_threshold`, the block ends there, else it keeps the default length. The block is then
denoised with the threshold rule (commit confidence >= `threshold`, always the top-1) until it is
done. Blocks follow the text's semantic steps (a line, a reasoning step) instead of cutting them.

Adaptation: that needs a model whose block layout can move. SDAR, TraDo and Fast-dLLM v2 are
trained with block-causal attention on blocks fixed at multiples of B, so here the attention block
cannot adapt; only the commit order inside it can. Inside the fixed block, AdaBlock's rule sets a
window, recomputed from the step's state alone (no memory between steps):

1. the positions up to and including the first committed delimiter that still has masked positions
   on its left (a delimiter committed earlier keeps its window until the window is done);
2. else, up to and including the most confident masked position proposing the delimiter with
   confidence >= `delimiter_threshold` (ties: the leftmost);
3. else the whole block.

Masked positions in the window are committed with the threshold rule (the window's most confident
masked position always); positions right of it wait until the window is fully committed. Then the
next window starts, as AdaBlock's next block would. Positions left of the canvas (the prompt's tail,
the emitted prefix) have no masked position on their left, so they never bound a window. Unlike the
paper, a window never reaches past the block, and one whose delimiter is still masked may move
between steps (AdaBlock fixes it at the block's first forward).

Parameters: `threshold` 0.9, `delimiter_threshold` 0.3 (the paper's LLaDA value; 0.5 for Dream),
`delimiter` the delimiter's token id: by default the served tokenizer's newline token (198 for
Qwen tokenizers, as used by SDAR/TraDo; set by the config hook), else per request or with
`--additional-config '{"blockdiff": {"delimiter": ID}}'`. Without one (None, e.g.
`"delimiter": null` per request) the policy is the plain threshold rule.
Use it for line-structured output (step-by-step reasoning, code, lists) with long blocks, where a
block usually spans several lines.
"""

from typing import Annotated

import msgspec
import torch

from vllm_blockdiff.policies.base import (
    Policy,
    PolicyInput,
    TokenId,
    masked_confidence,
    topk_mask,
)

_NO_DELIMITER = -1  # batched stand-in for None: matches no token id


class AdaBlockParams(msgspec.Struct, forbid_unknown_fields=True):
    threshold: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.9
    delimiter_threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.3
    delimiter: TokenId | None = None


class AdaBlockPolicy(Policy):
    def values(self, params: msgspec.Struct) -> list[float]:
        """None means no delimiter (the base class would read None as the block length)."""
        if params.delimiter is None:  # type: ignore[attr-defined]
            params = msgspec.structs.replace(params, delimiter=_NO_DELIMITER)
        return super().values(params)


def window_end(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """[R] int64: the last column of each row's window (L - 1 when it is the whole block)."""
    length = inp.masked.shape[-1]
    pos = torch.arange(length, device=inp.masked.device).expand_as(inp.masked)
    is_delimiter = inp.tokens == params["delimiter"][:, None]
    masked_before = (inp.masked.long().cumsum(-1) - inp.masked.long()) > 0
    # Committed in the block (padding right of it is unmasked too, and may hold any token).
    committed = ~inp.masked & (pos < inp.block_length[:, None])
    anchor = committed & is_delimiter & masked_before
    proposed = is_delimiter & (masked_confidence(inp) >= params["delimiter_threshold"][:, None])
    best = torch.where(proposed, inp.confidence, float("-inf")).argmax(-1)  # first max: leftmost
    whole = torch.full_like(best, length - 1)
    return torch.where(anchor.any(-1), anchor.long().argmax(-1),
                       torch.where(proposed.any(-1), best, whole))


def select(inp: PolicyInput, params: dict[str, torch.Tensor]) -> torch.Tensor:
    pos = torch.arange(inp.masked.shape[-1], device=inp.masked.device)
    eligible = inp.masked & (pos[None, :] <= window_end(inp, params)[:, None])
    conf = inp.confidence.masked_fill(~eligible, float("-inf"))
    confident = conf >= params["threshold"][:, None]
    return confident | topk_mask(conf, torch.ones_like(inp.step), eligible)


POLICY = AdaBlockPolicy("adablock", AdaBlockParams, select, doc=__doc__ or "")
