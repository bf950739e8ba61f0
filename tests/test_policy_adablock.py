"""AdaBlock's semantic window, checked exactly on hand-computed synthetic inputs.

Columns are block offsets; token 5 is the delimiter, 7 any other token.
"""

import pytest
import torch
from test_policies import _select

from vllm_blockdiff.options import OptionsError, ServeConfig, resolve_options
from vllm_blockdiff.policies import POLICIES, PolicyInput
from vllm_blockdiff.policies.adablock import AdaBlockParams, window_end

T, F = True, False
D, X = 5, 7


def _input(conf, tokens, masked=None, block_length=None):
    conf = torch.tensor(conf, dtype=torch.float32)
    r, length = conf.shape
    masked = torch.ones_like(conf, dtype=torch.bool) if masked is None else torch.tensor(masked)
    return PolicyInput(
        confidence=conf,
        masked=masked,
        tokens=torch.tensor(tokens),
        step=torch.zeros(r, dtype=torch.long),
        block_length=torch.tensor(block_length or [length] * r),
        committed_confidence_sum=torch.zeros(r),
        committed_count=(~masked).sum(-1),
        is_stop=torch.zeros(r, length, dtype=torch.bool),
    )


def _batched(inp, rows):
    policy = POLICIES["adablock"]
    return policy.batch_params(rows, inp.block_length.tolist(), torch.device("cpu"))


def _window_end(inp, **params):
    return window_end(inp, _batched(inp, [AdaBlockParams(**params)] * len(inp.step))).tolist()


# Delimiters proposed at 2 (0.6) and 5 (0.4); 4 and 7 are confident but right of 2.
CONF = [[0.95, 0.5, 0.6, 0.4, 0.97, 0.4, 0.3, 0.99]]
TOKENS = [[X, X, D, X, X, D, X, X]]


def test_window_ends_at_the_most_confident_masked_delimiter():
    inp = _input(CONF, TOKENS)
    assert _window_end(inp, delimiter=D) == [2]
    assert _select("adablock", inp, delimiter=D) == [[T, F, F, F, F, F, F, F]]
    # The threshold rule would also commit 4 and 7.
    assert _select("threshold", inp) == [[T, F, F, F, T, F, F, T]]


def test_delimiters_below_the_threshold_are_ignored():
    inp = _input(CONF, TOKENS)
    # 0.6 < 0.7: no window, the whole block, as the threshold rule.
    assert _window_end(inp, delimiter=D, delimiter_threshold=0.7) == [7]
    assert _select("adablock", inp, delimiter=D, delimiter_threshold=0.7) == [
        [T, F, F, F, T, F, F, T]]
    # Only 5 passes 0.35, though 2 is further left: the window ends at 5 (7 stays out).
    inp = _input([[0.95, 0.5, 0.25, 0.4, 0.97, 0.4, 0.3, 0.99]], TOKENS)
    assert _window_end(inp, delimiter=D, delimiter_threshold=0.35) == [5]
    assert _select("adablock", inp, delimiter=D, delimiter_threshold=0.35) == [
        [T, F, F, F, T, F, F, F]]


def test_equally_confident_delimiters_end_the_window_at_the_leftmost():
    inp = _input([[0.1, 0.5, 0.2, 0.5]], [[X, D, X, D]])
    assert _window_end(inp, delimiter=D) == [1]


def test_top1_is_taken_inside_the_window():
    # Window 0..2 (delimiter at 2, 0.6); nothing in it reaches 0.9: its top-1 (1, 0.8), not 7.
    inp = _input([[0.5, 0.8, 0.6, 0.4, 0.97, 0.4, 0.3, 0.99]], TOKENS)
    assert _select("adablock", inp, delimiter=D) == [[F, T, F, F, F, F, F, F]]


def test_a_committed_delimiter_keeps_its_window():
    # 3 holds a committed delimiter with masked positions on its left: the window is 0..3, though
    # 6 proposes the delimiter with 0.99 and 4 is confident.
    inp = _input([[0.95, 0.3, 0.92, 0.9, 0.97, 0.5, 0.99, 0.2]],
                 [[X, X, X, D, X, X, D, X]], masked=[[T, T, T, F, T, T, T, T]])
    assert _window_end(inp, delimiter=D) == [3]
    assert _select("adablock", inp, delimiter=D) == [[T, F, T, F, F, F, F, F]]


def test_the_first_open_committed_delimiter_bounds_the_window():
    # Committed delimiters at 2 and 5, both with masked positions on their left: 2 wins.
    inp = _input([[0.5, 0.6, 0.9, 0.95, 0.4, 0.9, 0.3, 0.2]],
                 [[X, X, D, X, X, D, X, X]], masked=[[T, T, F, T, T, F, T, T]])
    assert _window_end(inp, delimiter=D) == [2]
    assert _select("adablock", inp, delimiter=D) == [[F, T, F, F, F, F, F, F]]


def test_a_finished_window_hands_over_to_the_next():
    # 0..3 are committed (3 the previous window's delimiter): it no longer bounds anything, so the
    # masked delimiter at 6 (0.5) sets the next window 4..6.
    inp = _input([[0.9, 0.9, 0.9, 0.9, 0.97, 0.5, 0.5, 0.99]],
                 [[X, X, X, D, X, X, D, X]], masked=[[F, F, F, F, T, T, T, T]])
    assert _window_end(inp, delimiter=D) == [6]
    assert _select("adablock", inp, delimiter=D) == [[F, F, F, F, T, F, F, F]]


def test_columns_outside_the_block_never_bound_the_window():
    # Delimiter 0: the columns left of the canvas (unmasked, token 0) and the padding right of the
    # block (B = 4, token 0) look like committed delimiters, but none has a masked position on its
    # left inside the block, so the masked delimiter at 3 sets the window.
    inp = _input([[0.0, 0.0, 0.95, 0.6, 0.0, 0.0]], [[0, 0, X, 0, 0, 0]],
                 masked=[[F, F, T, T, F, F]], block_length=[4])
    assert _window_end(inp, delimiter=0) == [3]
    assert _select("adablock", inp, delimiter=0) == [[F, F, T, F, F, F]]


def test_without_delimiter_it_is_the_threshold_rule():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(16, 8, generator=gen) ** 0.3
    masked = torch.rand(16, 8, generator=gen) < 0.7
    masked[:, 0] = True
    tokens = torch.randint(0, 3, (16, 8), generator=gen)
    inp = _input(conf.tolist(), tokens.tolist(), masked=masked.tolist())
    expected = _select("threshold", inp)
    assert _select("adablock", inp) == expected  # delimiter None
    assert _select("adablock", inp, delimiter=9) == expected  # never proposed
    assert _select("adablock", inp, threshold=0.8) == _select("threshold", inp, threshold=0.8)


def test_batch_params_encode_no_delimiter_as_a_token_that_never_matches():
    inp = _input([[0.5] * 4] * 2, [[X] * 4] * 2)
    params = _batched(inp, [AdaBlockParams(), AdaBlockParams(delimiter=198)])
    assert params["delimiter"].tolist() == [-1, 198]
    assert params["threshold"].dtype == torch.float32


def _random_row(gen, length):
    """One block with random confidences, commits and tokens (delimiter 0 is frequent)."""
    b = int(torch.randint(1, length + 1, (1,), generator=gen))
    masked = torch.rand(b, generator=gen) < 0.7
    outside = int(torch.randint(0, b, (1,), generator=gen))
    masked[:outside] = False  # left of the canvas
    return dict(b=b, conf=torch.rand(b, generator=gen) ** 0.5, masked=masked,
                tokens=torch.randint(0, 3, (b,), generator=gen))


def _stack(rows, length):
    """Pad with unmasked delimiter columns whose confidence would win if it leaked."""
    def stack(key, fill):
        return torch.stack([torch.cat([r[key], torch.full((length - r["b"],), fill)])
                            for r in rows])

    masked = stack("masked", False)
    return PolicyInput(
        confidence=stack("conf", 0.999),
        masked=masked,
        tokens=stack("tokens", 0),
        step=torch.zeros(len(rows), dtype=torch.long),
        block_length=torch.tensor([r["b"] for r in rows]),
        committed_confidence_sum=torch.zeros(len(rows)),
        committed_count=(~masked).sum(-1),
        is_stop=torch.zeros_like(masked),
    )


def _run(rows, length, params):
    inp = _stack(rows, length)
    policy = POLICIES["adablock"]
    batched = policy.batch_params(params, [r["b"] for r in rows], torch.device("cpu"))
    return inp, policy.select(inp, batched)


def test_rows_are_independent_of_the_batch_and_padding():
    gen = torch.Generator().manual_seed(7)
    rows = [_random_row(gen, 16) for _ in range(24)]
    params = [AdaBlockParams(delimiter=i % 3 if i % 4 else None) for i in range(len(rows))]
    _, together = _run(rows, 24, params)
    for i, row in enumerate(rows):
        _, alone = _run([row], row["b"], [params[i]])
        assert torch.equal(together[i, :row["b"]], alone[0]), i
        assert not together[i, row["b"]:].any()
    _, reversed_ = _run(rows[::-1], 20, params[::-1])
    assert torch.equal(reversed_.flip(0)[:, :16], together[:, :16])


def test_progress_within_the_window_only():
    gen = torch.Generator().manual_seed(3)
    rows = [_random_row(gen, 8) for _ in range(64)]
    for r in rows:
        r["conf"] = r["conf"] * 0.5  # nothing reaches 0.9: exactly the window's top-1
    rows[0]["masked"][:] = False  # nothing masked: nothing committed
    params = [AdaBlockParams(delimiter=0, delimiter_threshold=0.1)] * len(rows)
    inp, commit = _run(rows, 8, params)
    assert not (commit & ~inp.masked).any()
    assert torch.equal(commit.sum(-1), inp.masked.any(-1).long())
    end = window_end(inp, _batched(inp, params))
    assert (commit.long().argmax(-1)[inp.masked.any(-1)] <= end[inp.masked.any(-1)]).all()


# --- options ------------------------------------------------------------------------------------

@pytest.fixture
def serve():
    return ServeConfig(block_length=4, max_block_length=16, mask_token_id=3)


def test_defaults_and_overrides(serve):
    params = resolve_options({"policy": "adablock"}, serve).params
    assert (params.threshold, params.delimiter_threshold, params.delimiter) == (0.9, 0.3, None)
    params = resolve_options({"policy": "adablock", "delimiter": 198, "threshold": 1,
                              "delimiter_threshold": 0.5}, serve).params
    assert (params.threshold, params.delimiter_threshold, params.delimiter) == (1.0, 0.5, 198)
    # A serve-time default (`--additional-config '{"blockdiff": {"delimiter": 198}}'`).
    serve.policy_defaults = {"delimiter": 198}
    assert resolve_options({"policy": "adablock"}, serve).params.delimiter == 198
    opts = resolve_options({"policy": "adablock", "delimiter": None}, serve)
    assert opts.params.delimiter is None


@pytest.mark.parametrize("args, field", [
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": 0}, "threshold"),
    ({"delimiter_threshold": -0.1}, "delimiter_threshold"),
    ({"delimiter_threshold": 1.5}, "delimiter_threshold"),
    ({"delimiter": -1}, "delimiter"),
    ({"delimiter": 1.5}, "delimiter"),
    ({"delimiter": "\n"}, "delimiter"),
    ({"tau": 0.9}, "tau"),  # not an adablock option
])
def test_invalid_params_name_the_field(serve, args, field):
    with pytest.raises(OptionsError, match=rf"vllm_xargs\.{field}:"):
        resolve_options({"policy": "adablock", **args}, serve)
