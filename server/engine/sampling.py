"""Picking the next token for every row of a batch, each row with its own settings: repetition penalty, the token
mask of its output constraint, suppressed tokens (EOS before min_new_tokens), greedy or temperature / top-k / top-p
sampling with the row's own seeded generator, and the log-probabilities a request asked for. Constrained and free rows
share the batch: masks apply to their own rows only."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def _sample_rows(scores: torch.Tensor, rows: Sequence[RowStep], indices: list[int]) -> list[int]:
    """Temperature / top-k / top-p sampling of the given rows, each from its own generator."""
    device = scores.device
    params = [rows[i].sampler.params for i in indices]
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=scores.dtype)
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=scores.dtype)
    subset = filter_top_k_top_p(scores[indices] / temperature[:, None], top_k, top_p)
    probs = subset.softmax(dim=-1)
    return [
        int(torch.multinomial(probs[j], 1, generator=rows[i].sampler.generator).item()) for j, i in enumerate(indices)
    ]


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
    token_ids = scores.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(rows) if not row.sampler.params.greedy]
    if sampled:
        for i, token in zip(sampled, _sample_rows(scores, rows, sampled), strict=True):
            token_ids[i] = token
    logprobs: list[float | None] = [None] * len(rows)
    top_tokens: list[list[tuple[int, float]]] = [[] for _ in rows]
    if model_logprobs is not None:
        for i, row in enumerate(rows):
            if row.logprobs:
                logprobs[i] = float(model_logprobs[i, token_ids[i]])
            if row.top_n:
                values, ids = model_logprobs[i].topk(row.top_n)
                top_tokens[i] = list(zip(ids.tolist(), values.tolist(), strict=True))
    return SampledTokens(token_ids=token_ids, logprobs=logprobs, top_tokens=top_tokens, mask_seconds=mask_seconds)
