"""The Triton vocabulary pass (token, confidence, entropy per logit row) against PyTorch.

On a machine without a GPU the kernel runs in Triton's interpreter (the plugin's CPU backend);
on CUDA it is compiled. Small tiles (BLOCK_V 128 / 256) make every row span several tiles.
"""

import pytest
import torch

from vllm_blockdiff.kernels.vocab_pass import vocab_stats, vocab_stats_torch, vocab_stats_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")


def _logits(n: int, v: int, dtype: torch.dtype, seed: int = 0, pad: int = 37) -> torch.Tensor:
    """[n >= 6, v] logits with -inf entries, ties and late maxima, as a slice of a wider
    tensor (row stride v + pad)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, v + pad, generator=g) * 3
    x = wide[:, :v]
    x[1, torch.rand(v, generator=g) < 0.3] = NEG_INF  # masked tokens
    x[2] = NEG_INF  # nearly all masked, the first tiles entirely
    x[2, [v - 200, v - 7, v - 1]] = torch.tensor([1.0, 2.5, -4.0])
    x[3, v - 1] = 50.0  # the maximum in the last (partial) tile
    x[4, [3, 5, v - 2]] = 40.0  # ties within the first tile and across tiles: index 3 wins
    x[5] = NEG_INF  # top-k style: two finite values, tied, in different tiles
    x[5, [v // 2, v - 3]] = 0.0
    return wide.to(device=DEVICE, dtype=dtype)[:, :v]


def _tokens(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g)
    tok[1] = torch.nonzero(logits[1].cpu() == NEG_INF)[0, 0]  # a masked token: confidence 0
    return tok.to(DEVICE)


@pytest.mark.parametrize("v, block_v", [(384, 128), (1000, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("need_entropy", [True, False])
def test_kernel_matches_torch(v, block_v, dtype, given, need_entropy):
    logits = _logits(6, v, dtype)
    assert logits.stride(0) > v
    tokens = _tokens(logits) if given else None
    tok, conf, ent = vocab_stats_triton(logits, tokens, need_entropy, block_v=block_v)
    exp_tok, exp_conf, exp_ent = vocab_stats_torch(logits, tokens, need_entropy)
    assert tok.dtype == torch.int64 and conf.dtype == torch.float32
    assert torch.equal(tok, exp_tok)
    if not given:
        assert tok[3].item() == v - 1 and tok[4].item() == 3 and tok[5].item() == v // 2
    torch.testing.assert_close(conf, exp_conf, atol=1e-5, rtol=1e-4)
    if need_entropy:
        assert ent.dtype == torch.float32 and not ent.isnan().any()
        torch.testing.assert_close(ent, exp_ent, atol=1e-5, rtol=1e-4)
    else:
        assert ent is None


@pytest.mark.parametrize("given", [False, True])
def test_a_row_is_the_same_alone_and_in_a_batch(given):
    """Batch invariance: each row's results are bit for bit those of the row alone."""
    logits = _logits(7, 1000, torch.bfloat16, seed=3)
    tokens = _tokens(logits) if given else None
    batch = vocab_stats_triton(logits, tokens, True, block_v=256)
    for r in range(7):
        alone = vocab_stats_triton(logits[r:r + 1], None if tokens is None else tokens[r:r + 1],
                                   True, block_v=256)
        for a, b in zip(alone, batch, strict=True):
            assert torch.equal(a, b[r:r + 1])


def test_empty_batch():
    logits = torch.randn(0, 384, device=DEVICE)
    for tokens in (None, torch.zeros(0, dtype=torch.int64, device=DEVICE)):
        tok, conf, ent = vocab_stats_triton(logits, tokens, True, block_v=128)
        assert tok.shape == conf.shape == ent.shape == (0,)
        tok, conf, ent = vocab_stats(logits, tokens, False)
        assert tok.shape == conf.shape == (0,) and ent is None
