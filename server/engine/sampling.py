"""Picking the next token for every row of a batch, each row with its own settings: repetition penalty, the token
mask of its output constraint, suppressed tokens (EOS before min_new_tokens), greedy or temperature / top-k / top-p
sampling with the row's own seeded generator, and the log-probabilities a request asked for. Constrained and free rows
share the batch: masks apply to their own rows only.

A row whose scores cannot be sampled from (NaN or +inf from the model or an adapter, or nothing left once its masks
apply) gets an error instead of a token: that request fails, the rest of the batch goes on."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraserve.errors import InvalidRequest, LoraserveError, ModelFailure
from loraserve.server.engine.constraints import RowConstraint, apply_masks
from loraserve.server.engine.params import SamplingParams


@dataclass
class RowSampler:
    """A request's sampling settings and its private random generator (None when greedy)."""

    params: SamplingParams
    seed: int | None
    generator: torch.Generator | None

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> RowSampler:
        if params.greedy:
            return cls(params=params, seed=None, generator=None)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return cls(params=params, seed=seed, generator=generator)


@dataclass(frozen=True)
class RowStep:
    """What one row needs for this step."""

    sampler: RowSampler
    history: Sequence[int] = ()  # prompt + generated ids, only when a repetition penalty applies
    suppressed_ids: Sequence[int] = ()  # e.g. EOS while fewer than min_new_tokens were generated
    logprobs: bool = False
    top_n: int = 0
    constraint: RowConstraint | None = None  # the row's output constraint, whose mask applies before sampling


@dataclass(frozen=True)
class SampledTokens:
    """The chosen token of each row, with its log-probability and top alternatives when asked for, and the seconds
    spent on constraint masks (0 when no row was constrained)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_tokens: list[list[tuple[int, float]]]
    mask_seconds: float = 0.0
    errors: dict[int, LoraserveError] = field(default_factory=dict)  # row -> its request's end (token_ids: -1)


def apply_repetition_penalty(scores: torch.Tensor, rows: Sequence[RowStep]) -> None:
    """HF/CTRL semantics, in place: a seen token's score is divided by the penalty when positive, multiplied when
    negative. scores: [B, V]."""
    for i, row in enumerate(rows):
        penalty = row.sampler.params.repetition_penalty
        if penalty == 1.0 or not row.history:
            continue
        seen = torch.tensor(sorted(set(row.history)), device=scores.device)
        values = scores[i, seen]
        scores[i, seen] = torch.where(values < 0, values * penalty, values / penalty)


def suppress_tokens(scores: torch.Tensor, rows: Sequence[RowStep]) -> None:
    """Forbid each row's suppressed tokens, unless they are all its constraint allows (a constraint that can only
    end now ends the text, min_new_tokens or not)."""
    constrained: list[tuple[int, list[int], torch.Tensor]] = []
    for i, row in enumerate(rows):
        if not row.suppressed_ids:
            continue
        ids = list(row.suppressed_ids)
        if row.constraint is not None:
            constrained.append((i, ids, scores[i, ids].clone()))
        scores[i, ids] = float("-inf")
    if constrained:
        nothing_left = torch.isneginf(scores[[i for i, _, _ in constrained]]).all(dim=-1).tolist()
        for (i, ids, kept), restore in zip(constrained, nothing_left, strict=True):
            if restore:
                scores[i, ids] = kept


def mask_constrained(scores: torch.Tensor, rows: Sequence[RowStep]) -> float:
    """Apply the token masks of the constrained rows, in place; the seconds it took."""
    constrained = [(i, row.constraint) for i, row in enumerate(rows) if row.constraint is not None]
    if not constrained:
        return 0.0
    started = time.perf_counter()
    apply_masks(scores, constrained)
    return time.perf_counter() - started


def filter_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p drop, per row. scores: [S, V]; top_k: [S] (0 = off); top_p: [S]."""
    vocab = scores.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth_best = scores.topk(int(k.max())).values.gather(1, (k - 1)[:, None])  # [S, 1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token once the tokens before it already reach top_p; the most likely token always stays.
        drop = (probs.cumsum(dim=-1) - probs) > top_p[:, None]
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores


def unsampleable_rows(logits: torch.Tensor, scores: torch.Tensor, rows: Sequence[RowStep]) -> dict[int, LoraserveError]:
    """Rows that no token can be drawn from, with the error their request ends with. logits: the model's [B, V];
    scores: after penalties and masks. NaN or +inf from the model is the model's failure; nothing left once the
    masks apply is the constraint's dead end (or, without one, the suppressed tokens')."""
    # One pass on the hot path: a row's maximum is finite exactly when it has no NaN (masks keep NaN), no +inf, and
    # not only -inf. Only the rows it flags are looked at again.
    flagged = ~torch.isfinite(scores.amax(dim=-1))
    if not bool(flagged.any()):
        return {}
    errors: dict[int, LoraserveError] = {}
    for i in torch.nonzero(flagged).flatten().tolist():
        constraint = rows[i].constraint
        if bool(torch.isnan(logits[i]).any() or torch.isposinf(logits[i]).any()):
            errors[i] = ModelFailure("the model produced NaN or infinite scores for this request")
        elif constraint is not None:
            errors[i] = InvalidRequest(f"cannot be followed further: {constraint.dead_end()}", "constraint")
        else:
            errors[i] = ModelFailure("no token is allowed here: the suppressed tokens exclude every token")
    return errors


def _sample_rows(scores: torch.Tensor, rows: Sequence[RowStep], indices: list[int]) -> dict[int, int | LoraserveError]:
    """Temperature / top-k / top-p sampling of the given rows, each from its own generator: row -> its token, or why
    it has none (the probabilities are not finite once scaled by the temperature)."""
    device = scores.device
    params = [rows[i].sampler.params for i in indices]
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=scores.dtype)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=scores.dtype)
    subset = filter_top_k_top_p(scores[indices] / temperature[:, None], top_k, top_p)
    probs = subset.softmax(dim=-1)
    usable = torch.isfinite(subset.amax(dim=-1)).tolist()  # a finite maximum makes the softmax finite, summing to 1
    chosen: dict[int, int | LoraserveError] = {}
    for j, i in enumerate(indices):
        if usable[j]:
            chosen[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].sampler.generator).item())
        else:
            chosen[i] = ModelFailure("the scores overflow at this temperature: the probabilities are not finite")
    return chosen


def sample_next(logits: torch.Tensor, rows: Sequence[RowStep]) -> SampledTokens:
    """Choose one token per row. logits: [B, V], row i of which belongs to rows[i]."""
    logits = logits.float()
    wants_logprobs = any(row.logprobs or row.top_n for row in rows)
    # Log-probabilities are reported under the model itself, before any penalty or sampling filter.
    model_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    scores = logits.clone()
    apply_repetition_penalty(scores, rows)
    mask_seconds = mask_constrained(scores, rows)
    suppress_tokens(scores, rows)
    errors = unsampleable_rows(logits, scores, rows)
    token_ids = scores.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if not row.sampler.params.greedy and i not in errors]
    if sampled:
        for i, token in _sample_rows(scores, rows, sampled).items():
            if isinstance(token, int):
                token_ids[i] = token
            else:
                errors[i] = token
    for i in errors:
        token_ids[i] = -1
    logprobs: list[float | None] = [None] * len(rows)
    top_tokens: list[list[tuple[int, float]]] = [[] for _ in rows]
    if model_logprobs is not None:
        for i, row in enumerate(rows):
            if i in errors:
                continue
            if row.logprobs:
                logprobs[i] = float(model_logprobs[i, token_ids[i]])
            if row.top_n:
                values, ids = model_logprobs[i].topk(row.top_n)
                top_tokens[i] = list(zip(ids.tolist(), values.tolist(), strict=True))
    return SampledTokens(token_ids, logprobs, top_tokens, mask_seconds, errors)
