"""Learn2PD: the rule on hand-built filters, its option validation, the trainer, and vLLM serving.

The hand-built filters are MLPs with known outputs: `_diagonal(b, t)` accepts a masked position
when its own confidence exceeds t by more than logit(accept) / 100 (0.032 at accept 0.96), and
`_first_decides(b)` accepts every position when position 0's confidence (as the filter sees it:
0 once committed) exceeds 0.5 by that margin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_policies_seed import _input

from vllm_blockdiff.options import OptionsError, ServeConfig, resolve_options
from vllm_blockdiff.policies import POLICIES
from vllm_blockdiff.policies.learn2pd import DEFAULT_PATH, MLP, read_filters
from vllm_blockdiff.reference.modeling import CausalLM

BUNDLED = Path(__file__).parent.parent / "examples" / "models" / "sdar-testbed"
T, F = True, False
K = 100.0


def _diagonal(b: int, t: float) -> dict[str, torch.Tensor]:
    return {f"B{b}.w1": torch.eye(b), f"B{b}.b1": torch.zeros(b),
            f"B{b}.w2": K * torch.eye(b), f"B{b}.b2": torch.full((b,), -K * t)}


def _first_decides(b: int) -> dict[str, torch.Tensor]:
    w1 = torch.zeros(1, b)
    w1[0, 0] = 1.0
    return {f"B{b}.w1": w1, f"B{b}.b1": torch.zeros(1),
            f"B{b}.w2": torch.full((b, 1), K), f"B{b}.b2": torch.full((b,), -K * 0.5)}


def _file(path: Path, *parts: dict[str, torch.Tensor]) -> str:
    save_file({k: v for part in parts for k, v in part.items()}, str(path))
    return str(path)


@pytest.fixture
def filters(tmp_path) -> dict[str, str]:
    return {
        "diag": _file(tmp_path / "diag.safetensors", _diagonal(4, 0.5), _diagonal(8, 0.8)),
        "low": _file(tmp_path / "low.safetensors", _diagonal(4, 0.2)),
        "first": _file(tmp_path / "first.safetensors", _first_decides(4)),
    }


def _select(inp, params: list[dict]) -> list[list[bool]]:
    policy = POLICIES["learn2pd"]
    rows = [policy.params_cls(**p) for p in params]
    batched = policy.batch_params(rows, inp.block_length.tolist(), torch.device("cpu"))
    return policy.select(inp, batched).tolist()


def test_accepts_where_the_filter_says_so(filters):
    inp = _input([[0.9, 0.55, 0.52, 0.1]])
    # logits 100 * (c - 0.5) = 40, 5, 2, -40; sigmoid(2) = 0.88 passes 0.8 but not 0.96.
    assert _select(inp, [{"filter": filters["diag"]}]) == [[T, T, F, F]]
    assert _select(inp, [{"filter": filters["diag"], "accept": 0.8}]) == [[T, T, T, F]]


def test_only_masked_positions_and_the_top1_guarantee(filters):
    inp = _input([[0.99, 0.6, 0.1, 0.2], [0.1, 0.3, 0.2, 0.05]], masked=[[F, T, T, T], [T] * 4])
    assert _select(inp, [{"filter": filters["diag"]}] * 2) == [[F, T, F, F], [F, T, F, F]]


def test_the_filter_reads_the_whole_block_with_committed_positions_at_zero(filters):
    p = [{"filter": filters["first"]}]
    assert _select(_input([[0.9, 0.2, 0.3, 0.1]]), p) == [[T, T, T, T]]
    # Position 0 is committed: the filter sees 0 there, accepts nothing; the top-1 still commits.
    assert _select(_input([[0.9, 0.2, 0.3, 0.1]], masked=[[F, T, T, T]]), p) == [[F, F, T, F]]


def test_mixed_block_lengths_and_files_in_one_batch(filters):
    rows = [
        ([0.6, 0.6, 0.1, 0.1, 0.99, 0.99, 0.99, 0.99], [T] * 4 + [F] * 4, 4, "diag"),
        ([0.6, 0.85, 0.6, 0.9, 0.1, 0.1, 0.1, 0.95], [T] * 8, 8, "diag"),  # B8's t = 0.8
        ([0.3, 0.6, 0.1, 0.25, 0.0, 0.0, 0.0, 0.0], [T] * 4 + [F] * 4, 4, "low"),
        ([0.3, 0.6, 0.1, 0.25, 0.0, 0.0, 0.0, 0.0], [T] * 4 + [F] * 4, 4, "diag"),
    ]
    expected = [[T, T, F, F] + [F] * 4, [F, T, F, T, F, F, F, T],
                [T, T, F, T] + [F] * 4, [F, T, F, F] + [F] * 4]
    inp = _input([r[0] for r in rows], masked=[r[1] for r in rows],
                 block_length=[r[2] for r in rows])
    params = [{"filter": filters[r[3]]} for r in rows]
    assert _select(inp, params) == expected
    for i, (conf, masked, b, name) in enumerate(rows):  # each row decides as if alone
        alone = _input([conf[:b]], masked=[masked[:b]], block_length=b)
        assert _select(alone, [{"filter": filters[name]}]) == [expected[i][:b]]


# --- options ------------------------------------------------------------------------------------

def _serve(**defaults) -> ServeConfig:
    return ServeConfig(block_length=4, max_block_length=16, mask_token_id=3,
                       policy_defaults=defaults)


def test_defaults_and_the_serve_default_filter(filters):
    opts = resolve_options({"policy": "learn2pd"}, _serve(filter=filters["diag"]))
    assert opts.params.accept == 0.96
    assert opts.params.filter == str(Path(filters["diag"]).resolve())
    opts = resolve_options({"policy": "learn2pd", "accept": 0.9}, _serve(filter=filters["low"]))
    assert (opts.params.filter, opts.params.accept) == (str(Path(filters["low"]).resolve()), 0.9)
    # Only the server names files to read.
    with pytest.raises(OptionsError, match=r"^vllm_xargs\.filter: set by the server"):
        resolve_options({"policy": "learn2pd", "filter": filters["low"]},
                        _serve(filter=filters["diag"]))


def test_bad_filter_files_name_the_field(filters, tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        None: "missing required field",
        str(tmp_path / "nope.safetensors"): "cannot read filter file",
        str(tmp_path / "garbage.safetensors"): "cannot read filter file",
        str(tmp_path): "cannot read filter file",
        _file(tmp_path / "names.safetensors", {"w1": torch.zeros(2, 4)}): "unexpected tensor",
        _file(tmp_path / "half.safetensors",
              {"B4.w1": torch.zeros(2, 4), "B4.b1": torch.zeros(2)}): "needs w1, b1, w2, b2",
        _file(tmp_path / "shape.safetensors",
              {**_diagonal(4, 0.5), "B4.w2": torch.zeros(3, 4)}): "not an MLP",
    }
    for path, message in cases.items():
        serve = _serve() if path is None else _serve(filter=path)
        with pytest.raises(OptionsError, match=rf"^vllm_xargs\.filter: .*{message}"):
            resolve_options({"policy": "learn2pd"}, serve)
    # The file has filters for B = 4 and 8 only.
    args, serve = {"policy": "learn2pd"}, _serve(filter=filters["diag"])
    resolve_options(args | {"block_length": 8}, serve)
    with pytest.raises(OptionsError, match=r"^vllm_xargs\.filter: .*no filter for block_length 16"):
        resolve_options(args | {"block_length": 16}, serve)


@pytest.mark.parametrize("accept", [0, 1, 1.5, -0.1, "high"])
def test_bad_accept_names_the_field(filters, accept):
    with pytest.raises(OptionsError, match=r"^vllm_xargs\.accept:"):
        resolve_options({"policy": "learn2pd", "accept": accept}, _serve(filter=filters["diag"]))


# --- trainer ------------------------------------------------------------------------------------

def test_logged_steps_follow_static_decoding():
    from tokenizers import Tokenizer

    from vllm_blockdiff.testbed.data import special_ids
    from vllm_blockdiff.testbed.learn2pd import Setup, log_steps
    from vllm_blockdiff.testbed.tasks import generate

    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    ids = special_ids(tok)
    setup = Setup(CausalLM.from_pretrained(BUNDLED).eval(), tok,
                  ServeConfig(block_length=4, max_block_length=8, mask_token_id=ids.mask), ids.eos)
    steps = log_steps(setup, generate("arithmetic", "train", 2, 0), 8)
    assert steps.confidence.shape[1] == 8 and len(steps.confidence) > 10
    assert not (steps.labelled & (steps.confidence == 0)).any()  # labelled => masked
    # Each step commits its most confident masked position: known, and right by definition.
    top = steps.confidence.argmax(-1, keepdim=True)
    assert steps.labelled.gather(1, top).all() and steps.correct.gather(1, top).all()


def test_trainer_writes_a_loadable_filter_file(tmp_path):
    from vllm_blockdiff.testbed.learn2pd import main

    out = main(["--model", str(BUNDLED), "--out", str(tmp_path / DEFAULT_PATH),
                "--block-sizes", "4,8", "--tasks", "arithmetic", "--n", "2", "--held-out", "1",
                "--iters", "5", "--eval-n", "1"])
    assert sorted(read_filters(str(out))) == [4, 8]
    assert out.stat().st_size < 100_000
    report = out.with_name("LEARN2PD.md").read_text()
    assert "--iters 5" in report and "| 8 | held_out |" in report and "| 4 | learn2pd |" in report


def test_the_bundled_filter_covers_the_trained_block_lengths():
    assert sorted(read_filters(str(BUNDLED / DEFAULT_PATH))) == [4, 8, 16]
    assert (BUNDLED / DEFAULT_PATH).stat().st_size < 100_000


# --- serving ------------------------------------------------------------------------------------

def test_config_hook_defaults_to_the_checkpoints_filter(tiny_sdar, tmp_path, filters):
    from test_config_hook import engine_config

    ckpt = tmp_path / "with_filter"
    shutil.copytree(tiny_sdar, ckpt)
    assert "filter" not in engine_config(str(ckpt)).model_config.hf_config.blockdiff[
        "policy_defaults"]
    (ckpt / DEFAULT_PATH).parent.mkdir()
    shutil.copy(filters["diag"], ckpt / DEFAULT_PATH)
    serve = engine_config(str(ckpt)).model_config.hf_config.blockdiff
    assert serve["policy_defaults"]["filter"] == str((ckpt / DEFAULT_PATH).resolve())
    chosen = engine_config(str(ckpt), additional_config={"blockdiff": {"filter": filters["low"]}})
    assert chosen.model_config.hf_config.blockdiff["policy_defaults"]["filter"] == filters["low"]


@pytest.fixture(scope="module")
def bundled_llm():
    from conftest import ENGINE_ARGS
    from vllm import LLM

    engine = LLM(str(BUNDLED), **ENGINE_ARGS)
    yield engine
    del engine


@pytest.mark.engine
def test_served_with_the_bundled_filter_matches_the_reference(bundled_llm):
    from tokenizers import Tokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_blockdiff.reference.decode import generate
    from vllm_blockdiff.testbed.data import encode_prompt, special_ids
    from vllm_blockdiff.testbed.tasks import generate as examples

    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    ids = special_ids(tok)
    prompts = [encode_prompt(tok, e.prompt)
               for task in ("arithmetic", "lists", "json") for e in examples(task, "test", 2)]
    requests = [(p, {"policy": "learn2pd", "block_length": b}) for b in (4, 16) for p in prompts]
    outs = bundled_llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p, _ in requests],
        [SamplingParams(max_tokens=64, temperature=0.0, extra_args=x) for _, x in requests],
        use_tqdm=False)
    serve = ServeConfig(block_length=4, max_block_length=16, mask_token_id=ids.mask,
                        policy_defaults={"filter": str(BUNDLED / DEFAULT_PATH)})
    model = CausalLM.from_pretrained(BUNDLED).eval()
    for (prompt, args), out in zip(requests, outs, strict=True):
        ref = generate(model, prompt, resolve_options(args, serve), ids.mask, 64, {ids.eos})
        assert list(out.outputs[0].token_ids) == ref.token_ids, args
        # A busy step's token budget may cut a canvas short: never fewer forwards, maybe more.
        assert out.kv_transfer_params["blockdiff"]["forwards"] >= ref.forwards, args
    stats = [o.kv_transfer_params["blockdiff"] for o in outs]
    assert sum(s["output_tokens"] for s in stats) > 2 * sum(s["forwards"] for s in stats)
    with pytest.raises(ValueError, match=r"vllm_xargs\.filter"):  # the file has no B = 2
        bundled_llm.generate([TokensPrompt(prompt_token_ids=prompts[0])],
                             SamplingParams(extra_args={"policy": "learn2pd", "block_length": 2}),
                             use_tqdm=False)


def test_the_filter_gives_each_row_the_same_bits_in_any_batch():
    """Greedy requests commit the same tokens whatever shares their batch, so the filter's
    logits for a row must not depend on the other rows (a GEMM's summation order does)."""
    g = torch.Generator().manual_seed(0)
    b, h = 16, 64
    mlp = MLP(torch.randn(h, b, generator=g), torch.randn(h, generator=g),
              torch.randn(b, h, generator=g), torch.randn(b, generator=g))
    confidence = torch.rand(37, b, generator=g)
    batch = mlp(confidence)
    for i in range(len(confidence)):
        assert torch.equal(mlp(confidence[i:i + 1])[0], batch[i]), i
