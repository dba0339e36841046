"""mirl: preference optimisation (DPO family, MIO, MI estimators) and reinforcement fine-tuning.

The functional core (losses, log-probs, advantages, rewards) is pure tensor code; recipes in
`mirl.recipes` are short training loops on top of it.
"""

__version__ = "0.1.0"
