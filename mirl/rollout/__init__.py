"""Batched sampling with a KV cache: the prompt is run once, then one token per step."""

from .sample import RolloutBatch, generate, left_pad

__all__ = ["RolloutBatch", "generate", "left_pad"]
