from .policy import Policy, load_policy, new_tiny_policy, positions_from_mask
from .tiny_lm import PRESETS, TinyGPT, TinyGPTConfig
from .tokenizer import CharTokenizer

__all__ = [
    "Policy",
    "load_policy",
    "new_tiny_policy",
    "positions_from_mask",
    "PRESETS",
    "TinyGPT",
    "TinyGPTConfig",
    "CharTokenizer",
]
