"""An environment as the run's task: its examples (train and held-out), its rollout of multi-turn episodes for
the online recipes (rollout/episodes.py), and its held-out evaluation (greedy episodes: success rate, turns,
tool calls, faults), in the places a single-turn task stands (recipes/common.load_prompts, held_out.py).

    task = EnvTask.load("calc", tokenizer, chat="auto", max_turns=4, max_tokens=96, timeout_s=10)
    scored = task.rollout(policy, examples, reward_set, group_size=8, max_new_tokens=32, temperature=1.0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..options import ConfigError
from ..rollout.episodes import run_episodes, score_episodes
from .host import EnvHost
from .loader import load_env
from .protocol import Renderer


@dataclass
class EnvTask:
    """An environment with the settings its episodes run under."""

    name: str
    factory: object  # () -> a fresh environment (one per episode)
    renderer: Renderer
    max_turns: int
    max_tokens: int  # tokens after the opening, in all turns and replies together
    timeout_s: float  # one tool call, reset or step at most
    faults: dict = field(default_factory=dict)  # counts by kind over the run

    @classmethod
    def load(cls, spec: str, tokenizer, *, chat: str, max_turns: int, max_tokens: int, timeout_s: float):
        """--env SPEC for a model's tokenizer: the chat-template protocol when chat is yes (or auto and the
        template renders tools), else the plain-text one (envs/protocol.py)."""
        factory, name = load_env(spec)
        tools = list(getattr(factory(), "tools", []) or [])
        use_chat = chat == "yes" or (chat == "auto" and getattr(tokenizer, "chat_template", None) is not None)
        return cls(name, factory, Renderer(tokenizer, tools, use_chat), max_turns, max_tokens, timeout_s)

    @classmethod
    def of(cls, cfg, tokenizer):
        """--env of a recipe's Config: its episodes under --max-turns, each turn at most --max-new-tokens and all
        at most --max-episode-tokens (0: max_turns x max_new_tokens), a tool call at most --tool-timeout-s."""
        budget = cfg.max_episode_tokens or cfg.max_turns * cfg.max_new_tokens
        return cls.load(cfg.env, tokenizer, chat=cfg.chat, max_turns=cfg.max_turns, max_tokens=budget,
                        timeout_s=cfg.tool_timeout_s)  # fmt: skip

    def examples(self, split: str, n: int, seed: int) -> list[dict]:
        """The environment's own examples (its `examples(split, n, seed)`); a ConfigError when it has none."""
        env = self.factory()
        if not hasattr(env, "examples"):
            raise ConfigError(f"--env {self.name}: it has no examples of its own; give prompts with --data")
        return env.examples(split, n, seed)

    def rollout(
        self,
        policy,
        examples: list[dict],
        reward_set,
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator=None,
        seeds=None,
        engine=None,
        **unused,
    ):
        """group_size episodes per example, scored (rollout/episodes.score_episodes): the rollout function the
        online recipes call in place of rollout_and_score. max_new_tokens: each model turn's limit."""
        if unused.get("noisy") is not None:
            raise ConfigError("--noisy-rollout is for single-turn image prompts; it does not apply with --env")
        t0 = time.perf_counter()
        host = EnvHost(self.factory, len(examples) * group_size, self.timeout_s)
        try:
            eps = run_episodes(
                policy,
                host,
                self.renderer,
                examples,
                group_size=group_size,
                max_turns=self.max_turns,
                max_tokens=self.max_tokens,
                turn_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                generator=generator,
                seeds=seeds,
                engine=engine,
            )
        finally:
            faults = dict(host.faults)
            host.close()
        for kind, n in faults.items():
            self.faults[kind] = self.faults.get(kind, 0) + n
        scored = score_episodes(eps, examples, group_size, reward_set, self.renderer, time.perf_counter() - t0)
        scored.metrics["episodes/faults"] = float(sum(faults.values()))
        return scored

    def score(self, text: str, example: dict) -> float:
        """A single-turn answer's score: a fresh environment's reward for it as the final turn (0 when none, or
        when the environment faults), run in an EnvHost like every call into an environment."""
        host = EnvHost(self.factory, 1, self.timeout_s)
        try:
            host.reset(0, example)
            step = host.step(0, self.renderer.final_answer(text))
        finally:
            host.close()
        return float(getattr(step, "reward", None) or 0.0)

    def evaluate_policy(self, policy, examples: list[dict], *, max_new_tokens: int) -> dict:
        """Greedy episodes on held-out examples -> {accuracy: the share of episodes with a positive reward,
        mean_score: the mean reward, rewards: each episode's (a fault's 0), samples: the first (prompt, transcript,
        reward), details: turns, tool calls and faults per episode} (mirl.eval.evaluate makes it an EvalResult)."""
        from ..rewards import RewardSet, parse_reward_spec

        rewards = RewardSet(parse_reward_spec("env", None), timeout_s=self.timeout_s)
        scored = self.rollout(policy, examples, rewards, group_size=1, max_new_tokens=max_new_tokens, temperature=0.0)
        values = [0.0 if r != r else float(r) for r in scored.rewards.tolist()]  # NaN (a fault): 0
        m = scored.metrics
        return {
            "accuracy": sum(v > 0 for v in values) / max(1, len(values)),
            "mean_score": sum(values) / max(1, len(values)),
            "rewards": values,
            "samples": [(e["prompt"], t, v) for e, t, v in list(zip(examples, scored.batch.texts, values))[:8]],
            "details": {k.replace("episodes/", "episode_"): v for k, v in m.items() if k.startswith("episodes/")},
        }
