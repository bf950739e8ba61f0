"""The seed papers' training-free policies, checked exactly on hand-computed synthetic inputs.

Each rule is checked against masks worked out by hand from the paper's formula; then every policy is
checked for row independence (a row decides the same alone or in any batch, with any padding) and
for progress, and its parameters are validated through the request-option path.
"""

import math

import pytest
import torch
from test_policies import _select

from vllm_blockdiff.options import OptionsError, ServeConfig, resolve_options
from vllm_blockdiff.policies import POLICIES, PolicyInput
from vllm_blockdiff.policies.eoser import log2_steps
from vllm_blockdiff.policies.localleap import anchor_distance

SEED_POLICIES = ("bacd", "localleap", "entropy", "factor", "ete", "eoser", "adablock")
T, F = True, False


def _input(conf, masked=None, step=0, block_length=None, committed_sum=0.0, committed_count=0,
           is_stop=None, entropy=None):
    conf = torch.tensor(conf, dtype=torch.float32)
    r, length = conf.shape
    masked = torch.ones_like(conf, dtype=torch.bool) if masked is None else torch.tensor(masked)
    is_stop = torch.zeros_like(masked) if is_stop is None else torch.tensor(is_stop)
    entropy = torch.ones_like(conf) if entropy is None else torch.tensor(entropy)

    def per_row(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * r, dtype=dtype)

    return PolicyInput(
        confidence=conf,
        masked=masked,
        tokens=torch.zeros(r, length, dtype=torch.long),
        step=per_row(step, torch.long),
        block_length=per_row(block_length or length, torch.long),
        committed_confidence_sum=per_row(committed_sum, torch.float32),
        committed_count=per_row(committed_count, torch.long),
        is_stop=is_stop,
        entropy=entropy.to(torch.float32),
    )




# --- bacd ---------------------------------------------------------------------------------------

def test_bacd_first_step_uses_the_clamped_max():
    inp = _input([[0.5, 0.7, 0.65, 0.2],      # tau = max = 0.7: only the max passes
                  [0.95, 0.92, 0.91, 0.5],    # tau = clamp(0.95) = hi = 0.9
                  [0.4, 0.1, 0.3, 0.2]])      # tau = clamp(0.4) = lo = 0.6: nobody, so top-1
    assert _select("bacd", inp) == [[F, T, F, F], [T, T, T, F], [T, F, F, F]]


def test_bacd_later_steps_use_the_block_history_mean():
    inp = _input(
        [[0.72, 0.69, 0.7, 0.1], [0.91, 0.89, 0.2, 0.1], [0.61, 0.59, 0.3, 0.1]],
        masked=[[T, T, T, T], [T, T, T, F], [T, T, T, T]],
        step=[1, 2, 1],
        committed_sum=[1.4, 2.85, 1.0],  # means 0.7 (>= keeps 0.7 itself), 0.95 -> hi, 0.5 -> lo
        committed_count=[2, 3, 2],
    )
    assert _select("bacd", inp) == [[T, F, T, F], [T, F, F, F], [T, F, F, F]]
    assert _select("bacd", inp, lo=0.3, hi=0.5) == [[T, T, T, F], [T, T, F, F], [T, T, F, F]]


# --- localleap ----------------------------------------------------------------------------------

def test_localleap_relaxes_the_threshold_near_anchors():
    # anchors at 0 (0.95) and 11 (0.92); radius 4 reaches 1..4 and 7..10.
    conf = [[0.95, 0.8, 0.5, 0.1, 0.76, 0.8, 0.8, 0.78, 0.1, 0.1, 0.1, 0.92]]
    expected = [[T, T, F, F, T, F, F, T, F, F, F, T]]  # 5 and 6 are 5+ away: need 0.9
    assert _select("localleap", _input(conf)) == expected
    # radius 0: the plain threshold rule
    assert _select("localleap", _input(conf), radius=0) == [[T] + [F] * 10 + [T]]


def test_localleap_without_anchor_commits_top1_and_ignores_committed_anchors():
    assert _select("localleap", _input([[0.8, 0.85, 0.1, 0.1]])) == [[F, T, F, F]]
    # position 0 is already committed: its 0.99 is no anchor, so position 1 needs 0.9.
    inp = _input([[0.99, 0.8, 0.85, 0.1]], masked=[[F, T, T, T]])
    assert _select("localleap", inp) == [[F, F, T, F]]


def test_anchor_distance():
    anchor = torch.tensor([[F, F, T, F, F, F, T], [F, F, F, F, F, F, F]])
    dist = anchor_distance(anchor).tolist()
    assert dist[0] == [2, 1, 0, 1, 2, 1, 0]
    assert min(dist[1]) > 1000  # no anchor: nothing is near


# --- entropy ------------------------------------------------------------------------------------

ENT = [[0.25, 0.125, 0.5, 0.375, 0.125]]  # ascending: 1, 4, 0, 3, 2; sums .125 .25 .5 .875 1.375


def test_entropy_sdar_rule_is_a_strict_cumulative_bound():
    conf = [[0.5] * 5]
    # cumulative 0.5 is not < 0.5: positions 1 and 4 only.
    assert _select("entropy", _input(conf, entropy=ENT), gamma=0.5) == [[F, T, F, F, T]]
    assert _select("entropy", _input(conf, entropy=ENT), gamma=0.51) == [[T, T, F, F, T]]
    # gamma 0: still the lowest-entropy position (tie between 1 and 4: leftmost).
    assert _select("entropy", _input(conf, entropy=ENT), gamma=0.0) == [[F, T, F, F, F]]


def test_entropy_paper_rule_discounts_the_max():
    # sum - max: 0, .125, .25, .5, .875 <= 0.5 -> four positions.
    inp = _input([[0.5] * 5], entropy=ENT)
    assert _select("entropy", inp, gamma=0.5, subtract_max=True) == [[T, T, F, T, T]]


def test_entropy_ignores_unmasked_positions():
    inp = _input([[0.5] * 5], masked=[[T, F, T, T, F]], entropy=ENT)
    # masked ascending: 0 (.25), 3 (.375), 2 (.5); sums .25 .625: only position 0 fits 0.5.
    assert _select("entropy", inp, gamma=0.5) == [[T, F, F, F, F]]


# --- factor -------------------------------------------------------------------------------------

def test_factor_thresholds_rise_with_rank():
    # factor 1: rank thresholds -, 2/3, 3/4, 4/5, 5/6. Sorted: .95 .79 .76 .70 .10 -> 3 pass.
    inp = _input([[0.7, 0.95, 0.76, 0.79, 0.1]])
    assert _select("factor", inp) == [[F, T, T, T, F]]
    # factor 2: thresholds -, 1/3, 1/2, 3/5, 2/3 -> .70 passes, .10 does not.
    assert _select("factor", inp, factor=2.0) == [[T, T, T, T, F]]


def test_factor_never_commits_a_failing_last_rank():
    # Fast-dLLM's loop would commit both (its last-index branch); the rule commits the top one.
    assert _select("factor", _input([[0.3, 0.5]])) == [[F, T]]
    assert _select("factor", _input([[0.7, 0.5]])) == [[T, F]]  # 0.5 < 2/3
    assert _select("factor", _input([[0.7, 0.9]])) == [[T, T]]  # 0.7 >= 2/3


# --- ete ----------------------------------------------------------------------------------------

def test_ete_explores_when_the_round_carries_few_bits():
    conf = [[0.95, 0.99, 0.5, 0.3], [0.4, 0.3, 0.2, 0.1]]
    ent = [[0.1, 0.05, 1.0, 2.0], [1.0, 2.0, 3.0, 0.5]]
    # row 0: exploit {0, 1} carries 0.09 bits < 1 -> also the highest-entropy open position (3).
    # row 1: the forced top-1 (0.4) carries 1.32 bits >= 1 -> no exploration.
    expected = [[T, T, F, T], [T, F, F, F]]
    assert -math.log2(0.95) - math.log2(0.99) < 1.0 < -math.log2(0.4)
    assert _select("ete", _input(conf, entropy=ent)) == expected
    assert _select("ete", _input(conf, entropy=ent), explore=2) == [[T, T, T, T], [T, F, F, F]]
    # min_bits 2: row 1's 1.32 bits now fall short -> its highest-entropy open position (2).
    assert _select("ete", _input(conf, entropy=ent), min_bits=2.0) == [[T, T, F, T], [T, F, T, F]]
    assert _select("ete", _input(conf, entropy=ent), min_bits=0.0) == [[T, T, F, F], [T, F, F, F]]
    assert _select("ete", _input(conf, entropy=ent), explore=0) == [[T, T, F, F], [T, F, F, F]]


def test_ete_explores_only_open_masked_positions():
    # position 0 has the highest entropy but is already exploited; 3 is not masked.
    inp = _input([[0.95, 0.2, 0.3, 0.1]], masked=[[T, T, T, F]],
                 entropy=[[5.0, 1.0, 1.0, 9.0]])
    assert _select("ete", inp) == [[T, T, F, F]]  # tie 1/2: leftmost


# --- eoser --------------------------------------------------------------------------------------

def test_log2_steps_is_ceil_log2():
    b = torch.tensor([1, 2, 3, 4, 5, 8, 9, 16, 32, 256, 1000])
    assert log2_steps(b).tolist() == [math.ceil(math.log2(x)) for x in b.tolist()]


def test_eoser_scales_stop_confidence_by_the_schedule():
    # B = 4 -> T = 2; step 0: gamma = 0.01 + 0.99 * 1/4 = 0.2575, so EOS at 0.8 scores 0.206.
    stop = [[T, F, F, F]]
    assert _select("eoser", _input([[0.8, 0.21, 0.1, 0.1]], is_stop=stop)) == [[F, T, F, F]]
    assert _select("eoser", _input([[0.8, 0.20, 0.1, 0.1]], is_stop=stop)) == [[T, F, F, F]]
    # g_min = 1: no suppression.
    assert _select("eoser", _input([[0.8, 0.21, 0.1, 0.1]], is_stop=stop), g_min=1.0) == [
        [T, F, F, F]]


def test_eoser_ascending_step_sizes():
    conf = [[0.9, 0.5, 0.3, 0.2, 0.1, 0.6, 0.05, 0.4]]  # B = 8 -> T = 3
    stop = [[T] + [F] * 7]
    # step 0: one position; EOS 0.9 * 0.13375 = 0.12 loses to 0.6.
    assert _select("eoser", _input(conf, is_stop=stop, step=0)) == [[F, F, F, F, F, T, F, F]]
    # step 1: two; gamma = 0.01 + 0.99 * 3/8 -> EOS 0.34 < 0.5.
    assert _select("eoser", _input(conf, is_stop=stop, step=1)) == [[F, T, F, F, F, T, F, F]]
    # step 2 = T - 1: everything left.
    masked = [[T, F, T, T, T, F, T, T]]
    assert _select("eoser", _input(conf, masked=masked, is_stop=stop, step=2)) == masked


@pytest.mark.parametrize("block_length, sizes", [
    (1, [1]), (2, [2]), (3, [1, 2]), (4, [1, 3]), (8, [1, 2, 5]), (16, [1, 2, 4, 9]),
    (256, [1, 2, 4, 8, 16, 32, 64, 129]),
])
def test_eoser_finishes_a_block_in_ceil_log2_steps(block_length, sizes):
    gen = torch.Generator().manual_seed(block_length)
    conf = torch.rand(1, block_length, generator=gen)
    masked = torch.ones(1, block_length, dtype=torch.bool)
    seen = []
    for step in range(len(sizes)):
        inp = _input(conf.tolist(), masked=masked.tolist(), step=step)
        commit = torch.tensor(_select("eoser", inp))
        seen.append(int(commit.sum()))
        masked &= ~commit
    assert seen == sizes and not masked.any()


# --- all seed policies --------------------------------------------------------------------------

def _random_rows(gen, rows, length):
    """Rows of different block lengths, steps and histories, each padded to `length` columns."""
    out = []
    for _ in range(rows):
        b = int(torch.randint(1, length + 1, (1,), generator=gen))
        conf = torch.rand(b, generator=gen) ** 0.3  # mostly confident, so rules fire
        masked = torch.rand(b, generator=gen) < 0.7
        count = int((~masked).sum())
        out.append(dict(
            conf=conf, masked=masked, b=b,
            step=int(torch.randint(0, 4, (1,), generator=gen)) if count else 0,
            committed_count=count,
            committed_sum=float(torch.rand(1, generator=gen)) * count,
            is_stop=torch.rand(b, generator=gen) < 0.2,
            entropy=torch.rand(b, generator=gen) * 0.3,
        ))
    return out


def _stack(rows, length, gen):
    """Pad each row to `length` with unmasked columns whose values would win if they leaked."""
    def pad(x, fill):
        extra = length - x.shape[0]
        return torch.cat([x, fill(extra)])

    def stack(key, fill):
        return torch.stack([pad(r[key], fill) for r in rows])

    return PolicyInput(
        confidence=stack("conf", lambda n: torch.full((n,), 0.999)),
        masked=stack("masked", lambda n: torch.zeros(n, dtype=torch.bool)),
        tokens=torch.zeros(len(rows), length, dtype=torch.long),
        step=torch.tensor([r["step"] for r in rows]),
        block_length=torch.tensor([r["b"] for r in rows]),
        committed_confidence_sum=torch.tensor([r["committed_sum"] for r in rows]),
        committed_count=torch.tensor([r["committed_count"] for r in rows]),
        is_stop=stack("is_stop", lambda n: torch.rand(n, generator=gen) < 0.5),
        entropy=stack("entropy", lambda n: torch.zeros(n)),
    )


@pytest.mark.parametrize("name", SEED_POLICIES)
def test_rows_are_independent_of_the_batch_and_padding(name):
    gen = torch.Generator().manual_seed(7)
    policy = POLICIES[name]
    rows = _random_rows(gen, 12, 16)
    params = [policy.params_cls() for _ in rows]

    def run(sub, length):
        inp = _stack(sub, length, gen)
        batched = policy.batch_params([params[0]] * len(sub), [r["b"] for r in sub],
                                      torch.device("cpu"))
        return policy.select(inp, batched)

    together = run(rows, 24)
    for i, row in enumerate(rows):
        alone = run([row], row["b"])[0]
        assert torch.equal(together[i, :row["b"]], alone), (name, i)
        assert not together[i, row["b"]:].any()
    reversed_ = run(rows[::-1], 20).flip(0)
    assert torch.equal(reversed_[:, :16], together[:, :16])


@pytest.mark.parametrize("name", SEED_POLICIES)
def test_progress_and_only_masked_positions(name):
    gen = torch.Generator().manual_seed(3)
    policy = POLICIES[name]
    rows = _random_rows(gen, 32, 8)
    for r in rows:
        r["conf"] = r["conf"] * 0.05  # hard: nothing passes any threshold
        r["entropy"] = r["entropy"] + 5.0
    rows[0]["masked"][:] = False  # a row with nothing masked commits nothing
    inp = _stack(rows, 8, gen)
    batched = policy.batch_params([policy.params_cls()] * len(rows), [r["b"] for r in rows],
                                  torch.device("cpu"))
    commit = policy.select(inp, batched)
    assert not (commit & ~inp.masked).any()
    has_masked = inp.masked.any(-1)
    assert torch.equal(commit.any(-1), has_masked)


# --- options ------------------------------------------------------------------------------------

@pytest.fixture
def serve():
    return ServeConfig(block_length=4, max_block_length=16, mask_token_id=3)


@pytest.mark.parametrize("name, defaults", [
    ("bacd", {"lo": 0.6, "hi": 0.9}),
    ("localleap", {"tau": 0.9, "tau_relax": 0.75, "radius": 4}),
    ("entropy", {"gamma": 0.35, "subtract_max": False}),
    ("factor", {"factor": 1.0}),
    ("ete", {"threshold": 0.9, "min_bits": 1.0, "explore": 1}),
    ("eoser", {"g_min": 0.01}),
])
def test_paper_defaults(serve, name, defaults):
    params = resolve_options({"policy": name}, serve).params
    assert {f: getattr(params, f) for f in params.__struct_fields__} == defaults
    assert POLICIES[name].needs_entropy == (name in ("entropy", "ete"))


@pytest.mark.parametrize("args, field", [
    ({"policy": "bacd", "lo": 2}, "lo"),
    ({"policy": "bacd", "hi": 0}, "hi"),
    ({"policy": "bacd", "lo": 0.95}, "lo"),  # above hi
    ({"policy": "bacd", "threshold": 0.9}, "threshold"),  # not a bacd option
    ({"policy": "localleap", "tau": 1.2}, "tau"),
    ({"policy": "localleap", "tau_relax": 0.95}, "tau_relax"),  # above tau
    ({"policy": "localleap", "radius": -1}, "radius"),
    ({"policy": "localleap", "radius": 1.5}, "radius"),
    ({"policy": "entropy", "gamma": -0.1}, "gamma"),
    ({"policy": "entropy", "subtract_max": "maybe"}, "subtract_max"),
    ({"policy": "factor", "factor": 0}, "factor"),
    ({"policy": "ete", "threshold": 1.5}, "threshold"),
    ({"policy": "ete", "min_bits": -1}, "min_bits"),
    ({"policy": "ete", "explore": -1}, "explore"),
    ({"policy": "eoser", "g_min": 1.5}, "g_min"),
])
def test_invalid_params_name_the_field(serve, args, field):
    with pytest.raises(OptionsError, match=rf"vllm_xargs\.{field}:"):
        resolve_options(args, serve)


def test_valid_overrides_resolve(serve):
    opts = resolve_options({"policy": "bacd", "lo": 0.5, "hi": 0.5}, serve)
    assert (opts.params.lo, opts.params.hi) == (0.5, 0.5)
    opts = resolve_options({"policy": "entropy", "subtract_max": True, "gamma": 1}, serve)
    assert (opts.params.subtract_max, opts.params.gamma) == (True, 1.0)
