"""Cut at the stop string that completes first in the text, not the first one in the list.

vLLM 0.26's `check_stop_strings` (v1/engine/detokenizer.py) searches the text a step added for
each stop string in the request's list order and cuts at the first string it finds. An AR model
adds one token per step, so that is the earliest match; a block-diffusion step commits several
tokens at once, and with `stop=[",", "="]` a `=` before the first `,` was kept.

Token-by-token decoding checks the text after every token, so it stops at the stop string that
completes first: the match that *ends* first (a string inside a longer one wins). This patch cuts
there. Matches ending at the same character complete in the same token whatever the tokenization,
and vLLM then takes the list's first: so does this patch. (Only where one AR token completes
several strings at different characters does AR's choice follow the list; the patch keeps the
earliest end, AR's choice under any tokenization that separates them.) The cut honours
`include_stop_str_in_output` as vLLM does: after the string, or at its start.

The detokenizer looks the function up in its module's globals at call time (no other module
imports it), so replacing the module attribute reaches every caller.
"""

from __future__ import annotations

from vllm.v1.engine import detokenizer

from vllm_blockdiff.patches.wrap import wrap_once

VLLM_VERSIONS = ("0.26.",)


def check_stop_strings(output_text: str, new_char_count: int, stop: list[str],
                       include_in_output: bool) -> tuple[str, int] | None:
    """vLLM's contract: (matched stop string, length to truncate the text to or -1), or None.

    Only matches ending in the last `new_char_count` characters are considered (earlier text
    was checked before), as in vLLM.
    """
    if not new_char_count or not stop:
        return None
    best: tuple[int, int, str] | None = None  # (end, start, stop string) of the earliest end
    for stop_str in stop:
        start = output_text.find(stop_str, 1 - new_char_count - len(stop_str))
        if start == -1:
            continue
        end = start + len(stop_str)  # a string's first match is also its earliest-ending one
        if best is None or end < best[0]:
            best = (end, start, stop_str)
    if best is None:
        return None
    end, start, stop_str = best
    if not include_in_output:
        return stop_str, start
    return stop_str, -1 if end >= len(output_text) else end


def apply() -> None:
    wrap_once(detokenizer, "check_stop_strings")(
        lambda _original, *args, **kwargs: check_stop_strings(*args, **kwargs))
