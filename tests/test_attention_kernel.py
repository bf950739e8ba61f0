"""The Triton block-causal paged-attention kernel against the PyTorch implementation.

On a machine without a GPU the kernel runs in Triton's interpreter (the plugin's CPU backend);
on CUDA it is compiled.
"""

import numpy as np
import pytest
import torch

from vllm_blockdiff.attention.ops import paged_block_causal_attention_torch, write_kv_cache
from vllm_blockdiff.attention.triton_kernel import auto_splits, paged_block_causal_attention_triton
from vllm_blockdiff.engine.layout import token_layout
from vllm_blockdiff.reference.modeling import block_causal_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(heads, kv_heads, head_dim, page, queries, dtype, seed=0):
    """queries: (first position, query length, block length[, drafts[, key end]]) per request;
    keys end with the query unless a key end is given (a sub-block run from the cache)."""
    queries = [(*q, 0, q[0] + q[1])[:5] if len(q) < 5 else q for q in queries]
    g = torch.Generator().manual_seed(seed)
    seq_lens = [start + n for start, n, *_ in queries]
    pages_per_req = [-(-max(s, q[4]) // page) for s, q in zip(seq_lens, queries, strict=True)]
    num_pages = sum(pages_per_req) + 3
    perm = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(queries), max(pages_per_req), dtype=torch.int32)
    used = 0
    for r, n in enumerate(pages_per_req):
        table[r, :n] = perm[used:used + n]
        used += n
    kc = torch.randn(num_pages, page, kv_heads, head_dim, generator=g)
    vc = torch.randn(num_pages, page, kv_heads, head_dim, generator=g)
    total = sum(n for _, n, *_ in queries)
    q = torch.randn(total, heads, head_dim, generator=g)
    k_new = torch.randn(total, kv_heads, head_dim, generator=g)
    v_new = torch.randn(total, kv_heads, head_dim, generator=g)
    pos = torch.cat([torch.arange(s, s + n) for s, n, *_ in queries])
    columns = list(zip(*[(s, n, d, b) for s, n, b, d, _ in queries], strict=True))
    layout = token_layout(*columns, key_end=np.array([q[4] for q in queries]))
    ranges = [torch.from_numpy(a).int() for a in layout[:3]]
    req_of = torch.cat([torch.full((n,), r) for r, (_, n, *_) in enumerate(queries)])
    slots = (table[req_of, pos // page].long() * page + pos % page)
    qsl = torch.tensor([0] + torch.tensor([n for _, n, *_ in queries]).cumsum(0).tolist(),
                       dtype=torch.int32)
    to = dict(device=DEVICE)
    return dict(q=q.to(dtype=dtype, **to), k_new=k_new.to(dtype=dtype, **to),
                v_new=v_new.to(dtype=dtype, **to), kc=kc.to(dtype=dtype, **to),
                vc=vc.to(dtype=dtype, **to), slots=slots.to(**to), qsl=qsl.to(**to),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                table=table.to(**to), ranges=[a.to(**to) for a in ranges], pos=pos,
                queries=queries)


CASES = [
    # prefill of 37 prompt tokens (B=4) beside a fused commit + denoise (2B=16 at 48, B=8)
    dict(heads=4, kv_heads=2, head_dim=32, page=16, queries=[(0, 37, 4), (48, 16, 8)]),
    # many short denoise steps, GQA 7:1 (non power of two), one-token block length (causal)
    dict(heads=7, kv_heads=1, head_dim=64, page=32, queries=[(5, 3, 4), (100, 4, 4), (17, 1, 1)]),
    # head_dim that is not a power of two
    dict(heads=2, kv_heads=2, head_dim=40, page=16, queries=[(30, 9, 16)]),
    # FreeDave drafts side by side: a finished block, 2 emitted tokens, the 6 open positions and
    # two more copies of the block (B=8), beside a request with one draft
    dict(heads=4, kv_heads=2, head_dim=32, page=16, queries=[(16, 32, 8, 22), (8, 8, 8, 8)]),
]


# Fast-dLLM v2's sub-block cache: the active sub-block (8 of a 32-token block, 3 of them open)
# sees the cached prefix and the whole block, the keys past its query included.
SUB_BLOCK = [(1024 + 8, 8, 32, 3, 1024 + 32), (64 + 24, 8, 32, 8, 96)]


# Triton's interpreter computes bfloat16 wrongly (numpy has no such type): compiled only.
BF16 = pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter lacks bfloat16")


@pytest.mark.parametrize("head_dim,heads,kv_heads,page,dtype,context", [
    (128, 28, 4, 16, torch.float16, 1024),  # Qwen2.5-7B heads (GQA 7)
    pytest.param(128, 28, 4, 16, torch.bfloat16, 1024, marks=BF16),
    (64, 8, 2, 32, torch.float16, 4096),
    (128, 4, 4, 32, torch.float16, 8192),
    pytest.param(128, 4, 4, 32, torch.bfloat16, 8192, marks=BF16),
])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_sub_block_queries_see_their_whole_block(head_dim, heads, kv_heads, page, dtype, context,
                                                 num_splits):
    queries = [(context + 8, 8, 32, 3, context + 32), *SUB_BLOCK[1:]]
    c = _case(heads, kv_heads, head_dim, page, queries, dtype)
    write_kv_cache(c["k_new"], c["v_new"], c["kc"], c["vc"], c["slots"])
    assert c["ranges"][0].tolist()[:8] == [context + 32] * 8
    expected, got = torch.zeros_like(c["q"]), torch.zeros_like(c["q"])
    meta = (c["qsl"], c["seq_lens"], c["table"], *c["ranges"], head_dim ** -0.5)
    paged_block_causal_attention_torch(c["q"], c["kc"], c["vc"], expected, *meta)
    paged_block_causal_attention_triton(c["q"], c["kc"], c["vc"], got, *meta, 8,
                                        num_splits=num_splits)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


# None: as served, the split count chosen by the launch's size (it asks the GPU its SM count).
@pytest.mark.parametrize("num_splits", [1, 3, 8] + ([None] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_torch(case, num_splits):
    """One pass over each tile's keys, or split-K: the keys divided between programs (some of
    them with no keys at all for short requests) and merged."""
    c = _case(**case, dtype=torch.float32)
    write_kv_cache(c["k_new"], c["v_new"], c["kc"], c["vc"], c["slots"])
    expected = torch.zeros_like(c["q"])
    got = torch.zeros_like(c["q"])
    args = (c["kc"], c["vc"])
    meta = (c["qsl"], c["seq_lens"], c["table"], *c["ranges"], 0.125)
    paged_block_causal_attention_torch(c["q"], *args, expected, *meta)
    max_q = max(n for _, n, *_ in c["queries"])
    paged_block_causal_attention_triton(c["q"], *args, got, *meta, max_q,
                                        num_splits=num_splits)
    torch.testing.assert_close(got, expected, atol=2e-5 if DEVICE == "cpu" else 2e-3, rtol=1e-3)


@pytest.mark.parametrize("tile_hint,num_splits", [(1, 1), (4, 1), (64, 1), (4, 4)])
def test_kernel_launch_is_independent_of_the_batch_shape(tile_hint, num_splits):
    """What a FULL CUDA graph replays: a launch sized for padded token and request counts, with
    any tile-height hint, gives the same result for the real requests (padding tokens belong to
    no request, as in vLLM's padded batches, and are left alone)."""
    c = _case(**CASES[0], dtype=torch.float32)
    write_kv_cache(c["k_new"], c["v_new"], c["kc"], c["vc"], c["slots"])
    t, pad_tokens, pad_reqs = c["q"].shape[0], 11, 3
    q = torch.cat([c["q"], torch.randn(pad_tokens, *c["q"].shape[1:], device=DEVICE)])
    qsl = torch.cat([c["qsl"], c["qsl"].new_full((pad_reqs,), t)])
    seq_lens = torch.cat([c["seq_lens"], c["seq_lens"].new_zeros(pad_reqs)])
    table = torch.cat([c["table"], c["table"].new_zeros(pad_reqs, c["table"].shape[1])])
    ranges = [torch.cat([r, r.new_zeros(pad_tokens)]) for r in c["ranges"]]
    expected = torch.zeros_like(c["q"])
    paged_block_causal_attention_torch(c["q"], c["kc"], c["vc"], expected, c["qsl"],
                                       c["seq_lens"], c["table"], *c["ranges"], 0.125)
    got = torch.full_like(q, float("nan"))
    paged_block_causal_attention_triton(q, c["kc"], c["vc"], got, qsl, seq_lens, table, *ranges,
                                        0.125, tile_hint, num_splits=num_splits)
    torch.testing.assert_close(got[:t], expected, atol=2e-5 if DEVICE == "cpu" else 2e-3,
                               rtol=1e-3)
    assert got[t:].isnan().all()  # padding tokens are left alone


def test_auto_splits_fill_two_waves():
    """Splits double while a launch's programs still fit two waves of SMs: on a 132-SM card one
    tile of 8 or 4 KV heads gets the cap of 16, 16 tiles of 4 KV heads 4, and launches that fill
    the card (or a card with few SMs) one."""
    assert [auto_splits(1, 8, 132), auto_splits(1, 4, 132), auto_splits(16, 4, 132)] == [16, 16, 4]
    assert auto_splits(64, 8, 132) == auto_splits(1, 8, 4) == 1


def test_torch_path_is_block_causal_attention():
    """The paged implementation equals dense attention under `block_causal_mask`."""
    c = _case(heads=2, kv_heads=1, head_dim=16, page=16, queries=[(0, 23, 4)], dtype=torch.float32)
    write_kv_cache(c["k_new"], c["v_new"], c["kc"], c["vc"], c["slots"])
    out = torch.zeros_like(c["q"])
    paged_block_causal_attention_torch(c["q"], c["kc"], c["vc"], out, c["qsl"], c["seq_lens"],
                                       c["table"], *c["ranges"], 0.25)
    mask = block_causal_mask(c["pos"], 23, 4).to(DEVICE)
    q, k, v = (t.transpose(0, 1) for t in (c["q"], c["k_new"], c["v_new"]))
    k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    att = ((q @ k.transpose(1, 2)) * 0.25).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, att.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_drafts_side_by_side_see_the_prefix_and_themselves():
    """A block of 4 at position 4 with one emitted token, its 3 open positions (draft 0) and one
    more draft (a whole copy of the block): each sees the prefix and its own copy, at the
    block's rotary positions."""
    layout = token_layout([4], [8], [7], [4])
    assert layout.kv_limit.tolist() == [8] * 4 + [12] * 4
    assert layout.skip_start.tolist() == [4] * 8
    assert layout.skip_end.tolist() == [4] * 4 + [8] * 4
    assert layout.rope_positions.tolist() == [4, 5, 6, 7, 4, 5, 6, 7]
    # one draft: block-causal attention, slot positions unchanged; keys end with the query
    plain = token_layout([0, 8], [6, 8], [0, 8], [4, 8])
    assert plain.kv_limit.tolist() == [4] * 4 + [6] * 2 + [16] * 8
    assert plain.rope_positions is None


@pytest.mark.skipif(DEVICE == "cpu", reason="vLLM's cache kernel is CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_kv_write_matches_index_copy(dtype):
    """vLLM's one-kernel write (with the layer's scales) fills the same slots as the two
    `index_copy_` launches and leaves padding tokens (negative slots) out."""
    c = _case(**CASES[0], dtype=dtype)
    slots = c["slots"].clone()
    slots[::5] = -1  # padding
    scales = (torch.ones((), device=DEVICE), torch.ones((), device=DEVICE))
    expected_k, expected_v, got_k, got_v = (c[x].clone() for x in ("kc", "vc", "kc", "vc"))
    keep = slots >= 0
    write_kv_cache(c["k_new"][keep], c["v_new"][keep], expected_k, expected_v, slots[keep])
    write_kv_cache(c["k_new"], c["v_new"], got_k, got_v, slots, scales)
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
