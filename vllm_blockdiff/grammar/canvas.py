"""Grammar constraint for one request's block-diffusion canvas.

Invariant: the matcher has consumed exactly the emitted text (the committed prefix, left to
right). Everything else is hypothetical and checked by accepting and rolling back, so the
committed prefix is always a valid prefix of the grammar's language.

Why the rules below. Block diffusion proposes a token at every masked position of the block in
one forward, but only the first uncommitted position `f` has a known left context, so only its
mask is exact: the engine masks the logits there (`mask_logits` / `fill_bitmask`). A token
proposed further right was sampled without knowing its left neighbours; it is kept only if it
continues a grammar-valid run from `f` (`commit_run`). A committed token to the right of a gap
cannot be checked until the gap is filled, so only a contiguous run is ever emitted; the engine
keeps such picks tentatively and passes them back in as selected once the run reaches them
(`commit_run` then keeps or rejects them). Tokens the grammar forces (one
allowed token, or forced text such as a fixed key) are committed without waiting for a forward
(`forced_tokens`, and inside `commit_run`).

One engine step for a request with a constraint `c`:
    logits at f        -> c.mask_logits(row)           (exact)
    sample tokens, run the policy                      (unchanged)
    run = c.commit_run(proposed[f:], selected[f:])     (positions f, f+1, ... to commit)
    commit and emit run; c.accept(run)
Before a block's first forward, `c.forced_tokens(B)` may pre-commit forced tokens.

End of output: a stop token (the matcher's `stop_token_ids`, the model's EOS ids) is allowed
exactly when the text is a complete sentence (`is_completed`); once accepted the constraint is
terminated and allows nothing but stop tokens. When only stop tokens are allowed, the first
of them is forced, so a finished output ends without another forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vllm_blockdiff.grammar import bitmask
from vllm_blockdiff.grammar.backend import GrammarBackend, Matcher
from vllm_blockdiff.grammar.spec import GrammarSpec


class ConstraintViolation(ValueError):
    """Tokens were emitted that the grammar does not allow (an engine bug: masks were skipped)."""


class CanvasConstraint:
    """The grammar state of one request; not thread-safe (one engine thread per request)."""

    def __init__(self, matcher: Matcher, vocab_size: int, encode: Callable[[str], list[int]]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.num_emitted = 0
        self._encode = encode
        self._bitmask = bitmask.allocate(1, vocab_size)

    @classmethod
    def create(cls, backend: GrammarBackend, spec: GrammarSpec,
               stop_token_ids: Sequence[int] | None = None) -> CanvasConstraint:
        """Compile (cached) and start at the empty prefix; raises GrammarError."""
        matcher = backend.matcher(backend.compile(spec), stop_token_ids)
        return cls(matcher, backend.vocab_size, backend.encode)

    # -- the first uncommitted position ---------------------------------------------------------

    def fill_bitmask(self, out: torch.Tensor, row: int = 0) -> None:
        """Allowed tokens at the first uncommitted position into row `row` of a host bitmask
        (`bitmask.allocate(R, vocab_size)`), for one batched `bitmask.apply` over many requests."""
        self.matcher.fill_bitmask(out, row)

    def mask_logits(self, logits: torch.Tensor) -> None:
        """Exact mask for the first uncommitted position: disallowed logits -> -inf, in place.

        `logits` is a [V'] row (or [..., V'] rows sharing this position's mask) on any device;
        columns past the model's vocabulary are disallowed too.
        """
        self.matcher.fill_bitmask(self._bitmask, 0)
        bitmask.apply(logits, self._bitmask[0])

    # -- positions further right -----------------------------------------------------------------

    def longest_valid_run(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, in order after the emitted text, the grammar accepts.

        The state is unchanged afterwards (accepted tokens are rolled back).
        """
        n = 0
        for t in tokens:
            if not self.matcher.accept(t):
                break
            n += 1
        self.matcher.rollback(n)
        return n

    def commit_run(self, proposed: Sequence[int], selected: Sequence[bool]) -> list[int]:
        """The tokens to commit at positions f, f+1, ... of the canvas (state unchanged).

        `proposed[j]` is the model's token at f+j (`proposed[0]` sampled under `mask_logits`),
        `selected[j]` whether the policy chose to commit it. Walking left to right, a position
        takes the proposed token if it is selected and grammar-valid, else the token(s) the
        grammar forces there; the run stops at the first position with neither, or after a stop
        token. Position 0 counts as selected: its exact mask makes the proposal valid, and
        committing it guarantees every forward makes progress (as AR decoding would).
        """
        run: list[int] = []
        n = len(proposed)
        while len(run) < n and not self.matcher.is_terminated():
            j = len(run)
            if (j == 0 or selected[j]) and self.matcher.accept(proposed[j]):
                run.append(int(proposed[j]))
                continue
            forced = self._accept_forced(n - j)
            if not forced:
                break
            run += forced
        self.matcher.rollback(len(run))
        return run

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces next (fast-forward); state unchanged."""
        out: list[int] = []
        while len(out) < limit:
            step = self._accept_forced(limit - len(out))
            if not step:
                break
            out += step
        self.matcher.rollback(len(out))
        return out

    # -- emitted text ----------------------------------------------------------------------------

    def accept(self, tokens: Sequence[int]) -> None:
        """Advance over newly emitted tokens; raises ConstraintViolation (state unchanged)."""
        for i, t in enumerate(tokens):
            if not self.matcher.accept(t):
                self.matcher.rollback(i)
                raise ConstraintViolation(
                    f"token {int(t)} at output position {self.num_emitted + i} is not allowed "
                    "by the grammar")
        self.num_emitted += len(tokens)

    def is_completed(self) -> bool:
        """The emitted text is a complete sentence: the output may end here (a stop is allowed)."""
        return self.matcher.is_completed()

    def is_terminated(self) -> bool:
        """A stop token was emitted."""
        return self.matcher.is_terminated()

    def reset(self) -> None:
        self.matcher.reset()
        self.num_emitted = 0

    # -- fast-forward ----------------------------------------------------------------------------

    def _accept_forced(self, budget: int) -> list[int]:
        """Accept (caller rolls back) up to `budget` forced tokens; [] if nothing is forced.

        Forced: the single allowed token; the first stop token when only stops are allowed; or
        the tokenization of xgrammar's jump-forward text minus its last token, which could merge
        with the text that follows (kept when the grammar ends right after it). Every token is
        checked by the matcher, so a tokenizer quirk can shorten the run but never break it.
        """
        if budget <= 0 or self.matcher.is_terminated():
            return []
        stops = self.matcher.stop_token_ids
        only = self._allowed_if_few(max(1, len(stops)))
        if only:
            if len(only) == 1:
                token = only[0]
            elif set(only) <= set(stops):
                token = next(t for t in stops if t in only)
            else:
                token = None
            if token is not None and self.matcher.accept(token):
                return [token]
        text = self.matcher.jump_forward_string()
        if not text:
            return []
        encoded = self._encode(text)
        tokens = encoded[:budget]
        taken = 0
        for t in tokens:
            if not self.matcher.accept(t):
                break
            taken += 1
        if taken and taken == len(encoded):
            rest = self._allowed_if_few(max(1, len(stops)))
            if not (rest is not None and set(rest) <= set(stops)):
                self.matcher.rollback(1)  # text continues: the last token may merge with it
                taken -= 1
        return tokens[:taken]

    def _allowed_if_few(self, limit: int) -> list[int] | None:
        self.matcher.fill_bitmask(self._bitmask, 0)
        return bitmask.allowed_ids(self._bitmask[0], limit)
