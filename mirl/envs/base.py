"""What an environment is to mirl: the opening turn of an episode, and the environment's answer to each of the
model's turns. Tools are functions the model may call inside a turn; the episode runner (rollout/episodes.py)
parses the calls, runs the tools and appends their results, and hands the environment only the turns that call
no tool (a final answer, a move in a game).

    class Env(Protocol):
        tools: list[Tool]                                  # may be empty
        def reset(self, example: dict) -> list[dict]       # the opening messages
        def step(self, message: str) -> Step               # a turn without a tool call -> the reply

A message is {"role": "system" | "user" | "tool", "content": str} with, optionally, "images": [PIL images or
paths] (a tool may answer with an image: the zoom environment's crop) and, for a tool result, "name". Rewards:
Step.reward (the episode's, or a turn's when the episode goes on); None leaves the episode to the run's reward
functions, scored on the last assistant message.

Optional methods: `finish() -> float | None`, called when the episode reaches the turn limit without the
environment ending it (its reward then, e.g. 0.0 for a game not solved; None: the reward functions decide), and
`examples(split, n, seed) -> list[dict]` ('train' or 'test', disjoint), the environment's own prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Tool:
    """A function the model may call: its name, description and JSON-schema parameters (as a chat template's
    `tools=` takes them), and the function (keyword arguments -> a string)."""

    name: str
    description: str
    parameters: dict  # {"type": "object", "properties": {...}, "required": [...]}
    fn: Callable[..., str]

    def schema(self) -> dict:
        """The OpenAI/transformers function schema of the tool."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class Step:
    """The environment's answer to a turn without a tool call."""

    messages: list[dict] = field(default_factory=list)  # its reply (empty when the episode ends)
    reward: float | None = None  # the turn's or episode's reward; None: the reward functions decide at the end
    done: bool = False


@dataclass
class ToolCall:
    """A tool call parsed from the model's turn (envs/protocol.py); error: why it could not be parsed or run
    ("unknown tool", "bad arguments"), given back to the model as the tool's result."""

    name: str
    arguments: dict
    error: str | None = None


@runtime_checkable
class Env(Protocol):
    """An environment: one instance per episode (built by the run's factory, so it may keep state)."""

    tools: list[Tool]

    def reset(self, example: dict) -> list[dict]:
        """Start an episode on an example -> its opening messages."""
        ...

    def step(self, message: str) -> Step:
        """The model's turn without a tool call (its text, call markup removed) -> the environment's answer."""
        ...
