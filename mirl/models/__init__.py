from .backends import positions_from_mask
from .facade import Policy
from .policy import load_policy, new_tiny_policy
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
