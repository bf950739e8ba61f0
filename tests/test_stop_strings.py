"""Stops cut at the first match in the text, also when one step commits several tokens.

vLLM's `check_stop_strings` takes the first stop string *in the list* found in a step's new text;
`patches/earliest_stop_string.py` makes it the one that completes first in the text, as
token-by-token decoding does. Stop token ids need no patch: vLLM's scheduler checks a step's
tokens one by one (`Scheduler._update_request_with_output`).
"""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.engine import detokenizer

from vllm_blockdiff.patches import PATCHES, earliest_stop_string


@pytest.fixture(scope="module")
def check():
    earliest_stop_string.apply()
    return detokenizer.check_stop_strings


def cut(check, text: str, new: int, stop: list[str], include: bool = False) -> str:
    """The output text after a step that added the last `new` characters of `text`."""
    match = check(text, new, stop, include)
    return text if match is None or match[1] == -1 else text[:match[1]]


def token_by_token(text: str, stop: list[str], include: bool) -> str:
    """AR decoding with one character per token, through vLLM's own check."""
    original = detokenizer.check_stop_strings.__wrapped__
    for end in range(1, len(text) + 1):
        if original(text[:end], 1, stop, include) is not None:
            return cut(original, text[:end], 1, stop, include)
    return text


def test_patch_is_registered_and_idempotent(check):
    assert earliest_stop_string in PATCHES
    earliest_stop_string.apply()
    assert detokenizer.check_stop_strings is check  # installed once
    assert not hasattr(check.__wrapped__, "__blockdiff__")  # wraps vLLM's, not itself
    text = "a=b,"
    assert check(text, len(text), [",", "="], False) == earliest_stop_string.check_stop_strings(
        output_text=text, new_char_count=len(text), stop=[",", "="], include_in_output=False)


def test_earliest_match_wins_not_the_list_order(check):
    text = "3900+7984=11884,"
    assert check(text, len(text), [",", "="], False) == ("=", 9)
    assert check(text, len(text), [",", "="], True) == ("=", 10)
    # vLLM's own check keeps the "=" (the bug this patch fixes)
    assert check.__wrapped__(text, len(text), [",", "="], False) == (",", 15)


def test_the_match_that_completes_first_wins(check):
    assert check("xabc", 4, ["abc", "b"], False) == ("b", 2)  # "b" completes before "abc"
    assert check("abc", 3, ["c", "bc"], False) == ("c", 2)  # same end: list order, as vLLM
    assert check("abc", 3, ["bc", "c"], False) == ("bc", 1)
    assert check("abc", 3, ["bc", "c"], True) == ("bc", -1)  # nothing to cut after the string


def test_only_matches_ending_in_the_new_text_count(check):
    assert check("a,b=", 1, [",", "="], False) == ("=", 3)  # "," was checked a step earlier
    assert check("a,b=", 0, [",", "="], False) is None
    assert check("ab", 2, [], False) is None


@pytest.mark.parametrize("include", [False, True])
def test_one_step_of_many_characters_equals_token_by_token(check, include):
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab,=") for _ in range(rng.randint(1, 12)))
        stop = ["".join(rng.choice("ab,=") for _ in range(rng.randint(1, 3)))
                for _ in range(rng.randint(1, 3))]
        assert cut(check, text, len(text), stop, include) == token_by_token(text, stop, include), \
            (text, stop)


# Engine level: static decoding with steps=1 commits a whole block in one forward, so a block's
# tokens reach the detokenizer and the scheduler's stop checks together.
B = 16
PROMPTS = ["def merge(a, b):\n    out = []\n", "import heapq\n\n", "x = 1\n", "class A:\n    "]


def blocks_of(llm, prompt_ids: list[int]):
    """Greedy output of `prompt_ids`, and its blocks as (first, end) output token indices."""
    params = SamplingParams(temperature=0.0, max_tokens=B * 3, ignore_eos=True,
                            extra_args={"policy": "static", "steps": 1, "block_length": B})
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
    assert out.kv_transfer_params["blockdiff"]["forwards_per_block"] == 1.0
    ids = list(out.outputs[0].token_ids)
    first = B - len(prompt_ids) % B  # the prompt's tail shares the first block
    starts = [0] + list(range(first, len(ids), B))
    return out.outputs[0], list(zip(starts, starts[1:] + [len(ids)], strict=True))


def first_pair(items: list, lo: int, hi: int, start: int = 1) -> tuple[int, int] | None:
    """Indices i < j in [lo, hi), i >= start, of two distinct items each first seen there."""
    firsts = [k for k in range(max(lo, start), hi) if items.index(items[k]) == k]
    return (firsts[0], firsts[-1]) if len(firsts) >= 2 else None


@pytest.fixture(scope="module")
def greedy(llm):
    tok = llm.get_tokenizer()
    return [(ids, *blocks_of(llm, ids)) for ids in (tok(p).input_ids for p in PROMPTS)]


def stop_params(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=B * 3, ignore_eos=True,
                          extra_args={"policy": "static", "steps": 1, "block_length": B},
                          **kwargs)


@pytest.mark.engine
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_at_the_earliest_match_in_a_step(llm, greedy, include):
    cases = 0
    for prompt_ids, out, blocks in greedy:
        text, tok = out.text, llm.get_tokenizer()
        for lo, hi in blocks:
            # the block's characters: decoded prefixes, where they agree with the output text
            a, b = len(tok.decode(out.token_ids[:lo])), len(tok.decode(out.token_ids[:hi]))
            if not text.startswith(tok.decode(out.token_ids[:hi])):
                continue
            pair = first_pair(list(text), a, b)
            if pair is None:
                continue
            i, j = pair
            stop = [text[j], text[i]]  # list order differs from text order
            res = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)],
                               stop_params(stop=stop, include_stop_str_in_output=include),
                               use_tqdm=False)[0].outputs[0]
            assert (res.finish_reason, res.stop_reason) == ("stop", text[i])
            assert res.text == text[:i + 1 if include else i], (text, stop)
            cases += 1
            break
    assert cases >= 2


@pytest.mark.engine
def test_stop_token_ids_cut_at_the_earliest_token_in_a_step(llm, greedy):
    cases = 0
    for prompt_ids, out, blocks in greedy:
        ids = list(out.token_ids)
        pair = next((p for lo, hi in blocks if (p := first_pair(ids, lo, hi)) is not None), None)
        if pair is None:
            continue
        i, j = pair
        res = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)],
                           stop_params(stop_token_ids=[ids[j], ids[i]]),
                           use_tqdm=False)[0].outputs[0]
        assert list(res.token_ids) == ids[:i + 1]  # the stop token is kept, as for AR models
        assert (res.finish_reason, res.stop_reason) == ("stop", ids[i])
        cases += 1
    assert cases >= 2
