"""The testbed trainer: block-diffusion mask and loss, greedy decoders, smoke runs, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_blockdiff.reference.modeling import CausalLM, ModelArgs, block_causal_mask
from vllm_blockdiff.testbed import EXACT_TASKS, generate
from vllm_blockdiff.testbed.data import build_tokenizer, encode, train_mixture
from vllm_blockdiff.testbed.decode import ar_greedy, sdar_greedy
from vllm_blockdiff.testbed.objectives import block_diffusion_mask, noise, sdar_loss
from vllm_blockdiff.testbed.train import (
    SMOKE,
    TrainConfig,
    build_model,
    fit,
    main,
    model_args,
    parse_config,
)
from vllm_blockdiff.tools.make_tiny_checkpoint import random_model

TINY = ModelArgs(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MASK_ID, EOS_ID = 3, 0


@pytest.fixture(scope="module")
def peaky() -> CausalLM:
    """Random weights with peaky logits, so greedy choices are well separated (no float ties)."""
    return random_model(TINY, seed=0, logit_scale=6.0).eval()


def test_block_diffusion_mask_is_the_documented_pattern():
    # L = 8, B = 4; rows/cols 0-7 are x_t, 8-15 are x_0 (both at positions 0-7).
    expected = [
        "1111000000000000",
        "1111000000000000",
        "1111000000000000",
        "1111000000000000",
        "0000111111110000",  # x_t block 1: its own block + clean x_0 block 0
        "0000111111110000",
        "0000111111110000",
        "0000111111110000",
        "0000000011110000",  # x_0 block 0: block-causal over x_0 only
        "0000000011110000",
        "0000000011110000",
        "0000000011110000",
        "0000000011111111",
        "0000000011111111",
        "0000000011111111",
        "0000000011111111",
    ]
    got = ["".join("1" if v else "0" for v in row) for row in block_diffusion_mask(8, 4).tolist()]
    assert got == expected
    # Block size 1 degenerates to: x_t sees itself and the clean strict prefix; x_0 is causal.
    m = block_diffusion_mask(5, 1)
    assert torch.equal(m[:5, :5], torch.eye(5, dtype=torch.bool))
    assert torch.equal(m[:5, 5:], torch.ones(5, 5, dtype=torch.bool).tril(-1))
    assert torch.equal(m[5:, 5:], block_causal_mask(torch.arange(5), 5, 1))


def test_training_logits_equal_the_kv_prefix_inference_path(peaky):
    """The x_t half of the training forward is exactly one denoising forward at inference."""
    torch.manual_seed(0)
    seq_len, b = 16, 4
    x0 = torch.randint(4, TINY.vocab_size, (1, seq_len))
    xt = x0.masked_fill(torch.rand(1, seq_len) < 0.5, MASK_ID)
    pos = torch.arange(seq_len)
    train_logits, _ = peaky(torch.cat([xt, x0], 1), torch.cat([pos, pos])[None],
                            block_diffusion_mask(seq_len, b)[None])
    for k in range(seq_len // b):
        lo, hi = k * b, (k + 1) * b
        cache = None
        if lo:
            _, cache = peaky(x0[:, :lo], pos[None, :lo], block_causal_mask(pos[:lo], lo, b)[None])
        logits, _ = peaky(xt[:, lo:hi], pos[None, lo:hi], torch.ones(1, b, hi, dtype=torch.bool),
                          cache)
        torch.testing.assert_close(train_logits[:, lo:hi], logits, atol=1e-5, rtol=1e-5)


def test_noise_masks_only_the_answer_region():
    ids = torch.arange(10, 42).reshape(2, 16)
    region = torch.zeros(2, 16, dtype=torch.bool)
    region[0, 5:16] = True
    region[1, 9:12] = True
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x_t, masked, t = noise(ids, region, 4, MASK_ID, 1e-3, gen)
        assert not (masked & ~region).any()
        assert torch.equal(x_t == MASK_ID, masked) and torch.equal(x_t[~masked], ids[~masked])
        assert torch.equal(t.view(2, 4, 4), t.view(2, 4, 4)[..., :1].expand(-1, -1, 4))


def _naive_sdar(model, prompt, b, max_new, shifted=False):
    """Full recompute each forward (no cache): block-causal clean prefix + the masked block;
    `shifted`: position j proposed from position j - 1 (Fast-dLLM v2)."""
    seq = list(prompt)
    start = len(seq) // b * b
    while len(seq) - len(prompt) < max_new and EOS_ID not in seq[len(prompt):]:
        block = seq[start:] + [MASK_ID] * (start + b - len(seq))
        while MASK_ID in block:
            ids = torch.tensor([seq[:start] + block])
            pos = torch.arange(start + b)
            out = model(ids, pos[None], block_causal_mask(pos, start + b, b)[None])[0][0]
            logits = out[start - 1 : start + b - 1] if shifted and start else out[start:]
            if shifted and not start:  # position 0 is a prompt token: its proposal is unused
                logits = torch.cat([torch.zeros_like(out[:1]), out[: b - 1]])
            logits[:, MASK_ID] = float("-inf")
            conf, tok = logits.softmax(-1).max(-1)
            masked = torch.tensor([t == MASK_ID for t in block])
            i = int(conf.masked_fill(~masked, -1).argmax())
            block[i] = int(tok[i])
        seq = seq[:start] + block
        start += b
    gen = seq[len(prompt):]
    return gen[: gen.index(EOS_ID)] if EOS_ID in gen else gen[:max_new]


def _naive_ar(model, prompt, max_new):
    seq = list(prompt)
    while len(seq) - len(prompt) < max_new:
        pos = torch.arange(len(seq))
        nxt = int(model(torch.tensor([seq]), pos[None], block_causal_mask(pos, len(seq), 1)[None])
                  [0][0, -1].argmax())
        seq.append(nxt)
        if nxt == EOS_ID:
            return seq[len(prompt):-1]
    return seq[len(prompt):]


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33, 34, 35]]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("b", [1, 4, 8])
def test_sdar_greedy_matches_naive_decoding_and_batching(peaky, b, shifted):
    batched = sdar_greedy(peaky, PROMPTS, b, MASK_ID, EOS_ID, 12, shifted)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert got == _naive_sdar(peaky, prompt, b, 12, shifted)
        assert got == sdar_greedy(peaky, [prompt], b, MASK_ID, EOS_ID, 12, shifted)[0]


def test_ar_greedy_matches_naive_decoding_and_batching(peaky):
    batched = ar_greedy(peaky, PROMPTS, EOS_ID, 10)
    for prompt, got in zip(PROMPTS, batched, strict=True):
        assert got == _naive_ar(peaky, prompt, 10)
        assert got == ar_greedy(peaky, [prompt], EOS_ID, 10)[0]


def test_tokenizer_keeps_digits_single_and_examples_short():
    examples = train_mixture(2000, seed=0)
    tok, special = build_tokenizer(examples, 768)
    assert tok.id_to_token(special.mask) == "<|MASK|>"
    assert tok.id_to_token(special.eos) == "<|endoftext|>"
    assert tok.encode("4821+379", add_special_tokens=False).tokens == list("4821+379")
    for task in ("arithmetic", "lists", "json"):
        enc, kept = encode(tok, generate(task, "test", 200, seed=0), 96, special.eos)
        assert len(kept) >= 190, task  # most in-distribution examples fit 96 tokens


@pytest.mark.parametrize("arch", ["sdar", "qwen3", "fast_dllm", "qwen2"])
def test_loss_decreases_on_a_tiny_overfit_set(arch):
    cfg = TrainConfig(arch=arch, out="", **{**SMOKE, "steps": 30, "warmup": 3, "lr": 3e-3,
                                            "log_every": 30})
    tok, special = build_tokenizer(train_mixture(200, seed=0), cfg.vocab_size)
    data, _ = encode(tok, generate("lists", "train", 8, seed=0), 64, special.eos)
    model = build_model(model_args(cfg, tok.get_vocab_size()), seed=0)
    stats = fit(model, data, cfg, special, torch.device("cpu"), log=lambda _: None)
    first, last = sum(stats.losses[:5]) / 5, sum(stats.losses[-5:]) / 5
    assert last < 0.8 * first, stats.losses


def test_sdar_loss_weightings_agree_when_everything_is_masked(peaky):
    ids = torch.randint(4, TINY.vocab_size, (2, 8))
    plen, length = torch.tensor([2, 3]), torch.tensor([8, 8])
    gen = torch.Generator().manual_seed(0)
    # eps = 1 forces t = 1: every answer token is masked and 1/t = 1, so both weightings match.
    a = sdar_loss(peaky, ids, plen, length, 4, MASK_ID, 4, 1.0, "inv_t", gen)
    b = sdar_loss(peaky, ids, plen, length, 4, MASK_ID, 4, 1.0, "mean", gen)
    torch.testing.assert_close(a, b)


def test_fast_dllm_loss_predicts_each_token_from_the_position_before(peaky):
    """Fast-dLLM v2's shifted loss, checked against plain forwards: with every answer token
    masked (eps = 1), a block's first token is predicted from the clean position before it (the
    AR step) and every other one from the masked block's previous position, seeing the clean
    blocks before; the complementary copy then masks nothing."""
    import torch.nn.functional as F

    ids = torch.randint(4, TINY.vocab_size, (2, 8))
    plen, length = torch.tensor([4, 5]), torch.tensor([8, 8])
    loss = sdar_loss(peaky, ids, plen, length, 4, MASK_ID, 4, 1.0, "mean",
                     torch.Generator().manual_seed(0), shifted=True)
    pos = torch.arange(8)
    region = (pos[None] >= plen[:, None]) & (pos[None] < length[:, None])
    inputs = ids.masked_fill(region, MASK_ID)  # block 0 clean, block 1 masked past the prompt
    logits, _ = peaky(inputs, pos[None].expand(2, -1), block_causal_mask(pos, 8, 4)[None])
    rows, cols = region.nonzero(as_tuple=True)
    expected = F.cross_entropy(logits[rows, cols - 1].float(), ids[rows, cols])
    torch.testing.assert_close(loss, expected)


def test_smoke_flags_override():
    cfg = parse_config(["--arch", "sdar", "--out", "x", "--smoke", "--steps", "7",
                        "--block-sizes", "4,8"])
    assert cfg.steps == 7 and cfg.hidden_size == SMOKE["hidden_size"] and cfg.block_sizes == [4, 8]
    full = parse_config(["--arch", "qwen3", "--out", "x"])
    assert full.hidden_size == TrainConfig(arch="qwen3", out="x").hidden_size


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("testbed")
    runs = {arch: main(["--arch", arch, "--out", str(root / arch), "--smoke", "--seed", "1"])
            for arch in ("sdar", "qwen3")}
    runs["sdar-again"] = main(["--arch", "sdar", "--out", str(root / "again"), "--smoke",
                               "--seed", "1"])
    runs["sdar-from-ar"] = main(["--arch", "sdar", "--out", str(root / "adapted"), "--smoke",
                                 "--init-from", str(runs["qwen3"])])
    runs["qwen2"] = main(["--arch", "qwen2", "--out", str(root / "qwen2"), "--smoke"])
    runs["fast_dllm"] = main(["--arch", "fast_dllm", "--out", str(root / "fast_dllm"), "--smoke",
                              "--init-from", str(runs["qwen2"]), "--eval-block-size", "8"])
    return runs


@pytest.mark.parametrize("arch,architecture", [("sdar", "SDARForCausalLM"),
                                               ("qwen3", "Qwen3ForCausalLM")])
def test_smoke_training_writes_a_loadable_checkpoint(smoke_runs, arch, architecture):
    out = smoke_runs[arch]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["torch_dtype"] == "bfloat16"
    assert ("mask_token_id" in config) == (arch == "sdar")
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    model = CausalLM.from_pretrained(out)
    assert model.args.hidden_size == SMOKE["hidden_size"]
    record = json.loads((out / "training.json").read_text())
    assert record["command"].startswith("python -m vllm_blockdiff.testbed.train --arch " + arch)
    assert record["config"]["seed"] == 1
    assert set(record["metrics"]["eval"]) == {f"{task}/{split}" for task in EXACT_TASKS
                                              for split in ("test", "hard")}
    assert record["metrics"]["steps"] == SMOKE["steps"]
    text = (out / "TRAINING.md").read_text()
    assert record["command"] in text and "final train loss" in text


def test_training_is_deterministic_given_the_seed(smoke_runs):
    a, b = smoke_runs["sdar"], smoke_runs["sdar-again"]
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    qa = json.loads((a / "training.json").read_text())["metrics"]
    qb = json.loads((b / "training.json").read_text())["metrics"]
    assert qa["final_train_loss"] == qb["final_train_loss"]


def test_sdar_can_start_from_the_ar_twin(smoke_runs):
    """SDAR's recipe: the block-diffusion model adapts the AR twin's weights and tokenizer."""
    ar, adapted = smoke_runs["qwen3"], smoke_runs["sdar-from-ar"]
    assert (ar / "tokenizer.json").read_bytes() == (adapted / "tokenizer.json").read_bytes()
    record = json.loads((adapted / "training.json").read_text())
    assert record["init_from"]["command"].startswith("python -m vllm_blockdiff.testbed.train")
    assert json.loads((adapted / "config.json").read_text())["architectures"] == ["SDARForCausalLM"]
    before = CausalLM.from_pretrained(ar).state_dict()
    after = CausalLM.from_pretrained(adapted).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fast_dllm_adapts_its_qwen2_twin(smoke_runs):
    """Fast-dLLM v2's recipe on the testbed: the AR twin in Qwen2's layout (q/k/v biases, no q/k
    norms, tied embeddings), adapted with the shifted loss; the checkpoint has the published
    config keys (block length in `bd_size`)."""
    twin, out = smoke_runs["qwen2"], smoke_runs["fast_dllm"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Fast_dLLM_QwenForCausalLM"] and config["bd_size"] == 8
    assert json.loads((twin / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    args = CausalLM.from_pretrained(out).args
    assert args.attention_bias and not args.qk_norm and args.tie_word_embeddings
    record = json.loads((out / "training.json").read_text())
    assert "shifted" in record["loss"] and record["decoder"].startswith("shifted SDAR greedy")
    assert record["init_from"]["command"].startswith("python -m vllm_blockdiff.testbed.train "
                                                     "--arch qwen2")


def test_budget_mode_picks_steps_that_reproduce_exactly():
    base = {**SMOKE, "warmup": 8, "log_every": 1000}
    tok, special = build_tokenizer(train_mixture(200, seed=0), SMOKE["vocab_size"])
    data, _ = encode(tok, generate("lists", "train", 16, seed=0), 64, special.eos)

    def train(**over):
        cfg = TrainConfig(arch="sdar", out="", **{**base, **over})
        model = build_model(model_args(cfg, tok.get_vocab_size()), seed=0)
        return fit(model, data, cfg, special, torch.device("cpu"), log=lambda _: None)

    budgeted = train(budget_s=1.0)
    assert budgeted.steps >= base["warmup"] and len(budgeted.losses) == budgeted.steps
    assert train(steps=budgeted.steps).losses == budgeted.losses


def test_evaluate_command_scores_the_bundled_model(tmp_path):
    """`python -m vllm_blockdiff.testbed.evaluate` scores a checkpoint and writes its JSON: the
    bundled SDAR model solves a few held-out arithmetic examples."""
    from vllm_blockdiff.testbed.evaluate import main

    out = tmp_path / "scores.json"
    model = Path(__file__).parents[1] / "examples" / "models" / "sdar-testbed"
    scores = main(["--model", str(model), "--arch", "sdar",
                   "--tasks", "arithmetic", "--n", "4", "--seed", "1", "--out", str(out)])
    assert scores["arithmetic"].correct == 4
    assert json.loads(out.read_text())["scores"]["arithmetic"]["n"] == 4
