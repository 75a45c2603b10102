"""The engine's live counters, as ModelInfo reports them (a plain value: the gRPC side reads it without torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """Live counters for ModelInfo; field names are ServerStats'."""

    active_requests: int
    queued_requests: int
    generated_tokens: int
    completed_requests: int
    uptime_seconds: float
    kv_cache_tokens: int
    kv_cache_used_tokens: int
    kv_cache_blocks: int = 0
    kv_cache_block_size: int = 0
    kv_cache_used_blocks: int = 0
    kv_cache_cached_blocks: int = 0
    prefix_caching: bool = False
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0
    constrained_requests: int = 0
    constraint_mask_steps: int = 0
    constraint_mask_seconds: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens if self.prefix_cache_queried_tokens else 0
        )
