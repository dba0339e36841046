"""Accuracy and pass@k of a policy on a task's held-out split, scored by the task's verifier.

accuracy  greedy decoding, fraction scored correct (score >= the task's success threshold, 1 by default;
          grounding: IoU >= 0.5), and the mean score (grounding: mean IoU); grounding also says where
          the greedy boxes land (boxes/on_target, on_other, off_shapes, no_box, iou_on_target)
pass@k    n >= k samples per prompt at `temperature`, the unbiased estimator of Chen et al. 2021:
          pass@k = mean over prompts of 1 - C(n - c, k) / C(n, k), c = correct samples

mirl eval --model runs/sft/final --task arith --k 8
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import torch

from .options import ConfigError, choice
from .rollout.score import completions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k draws (without replacement) from n samples with c correct is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalResult:
    """Held-out accuracy, pass@k, the mean score and a few samples of one evaluation."""

    accuracy: float
    pass_at_k: float | None
    k: int
    n: int
    samples: list[tuple[str, str, float]]  # (prompt, greedy completion, score), a few for reports
    mean_score: float = 0.0  # mean task score (grounding: mean IoU)
    details: dict | None = None  # the task's breakdown of the greedy answers, if it has one (grounding)

    def as_dict(self) -> dict:
        """The numbers as a JSON-able dict (pass@k under its name)."""
        d = {"accuracy": self.accuracy, "mean_score": self.mean_score, "n": self.n, **(self.details or {})}
        if self.pass_at_k is not None:
            d[f"pass@{self.k}"] = self.pass_at_k
        return d


def evaluate(
    policy,
    task,
    examples: list[dict],
    *,
    max_new_tokens: int,
    k: int = 1,
    n_samples: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> EvalResult:
    """Greedy accuracy on `examples` by the task's verifier, and pass@k from n_samples samples per prompt when k > 1."""
    if hasattr(task, "evaluate_policy"):  # an environment (envs/task.py): greedy multi-turn episodes
        if k > 1:
            raise ConfigError("--k > 1 (pass@k) is not supported with --env yet: evaluate greedy episodes (--k 1)")
        r = task.evaluate_policy(policy, examples, max_new_tokens=max_new_tokens)
        return EvalResult(r["accuracy"], None, 1, len(examples), r["samples"], r["mean_score"], r["details"])
    prompts = [e["prompt"] for e in examples]
    images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
    greedy = completions(policy, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, images=images)
    scores = [task.score(c[0], e) for c, e in zip(greedy, examples)]
    success = getattr(task, "success_threshold", 1.0)
    acc = sum(s >= success for s in scores) / max(1, len(scores))
    pk = None
    if k > 1:
        n = n_samples or k
        sampled = completions(
            policy,
            prompts,
            max_new_tokens=max_new_tokens,
            samples=n,
            temperature=temperature,
            batch_size=max(1, batch_size // n),
            seed=seed,
            images=images,
        )
        per_prompt = [sum(task.score(c, e) >= success for c in cs) for cs, e in zip(sampled, examples)]
        pk = sum(pass_at_k(n, c, k) for c in per_prompt) / max(1, len(per_prompt))
    samples = [(p, c[0], s) for p, c, s in list(zip(prompts, greedy, scores))[:8]]
    details = task.breakdown([c[0] for c in greedy], examples) if hasattr(task, "breakdown") else None
    return EvalResult(acc, pk, k, len(examples), samples, sum(scores) / max(1, len(scores)), details)


def sampled_accuracy(
    policy, task, examples: list[dict], *, max_new_tokens: int, samples: int = 8, temperature: float = 1.0, seed=0
) -> float:
    """The fraction of `samples` sampled responses per prompt that the task's verifier accepts (pass@1 estimated
    from n samples): what an RL step optimises, measured with far less noise than greedy accuracy on the same
    prompts (300 prompts x 8 samples: a standard error of about 0.01 against about 0.03)."""
    images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
    prompts = [e["prompt"] for e in examples]
    sampled = completions(
        policy, prompts, max_new_tokens=max_new_tokens, samples=samples, temperature=temperature, seed=seed,
        batch_size=max(1, 256 // samples), images=images,
    )  # fmt: skip
    success = getattr(task, "success_threshold", 1.0)
    right = sum(task.score(c, e) >= success for cs, e in zip(sampled, examples) for c in cs)
    return right / max(1, samples * len(examples))


@dataclass
class Config:
    """Options of `mirl eval`."""

    model: str = "runs/demo/sft/final"  # saved model folder, preset or hub id
    model_revision: str = ""  # the hub revision (branch, tag, commit) of a hub model --model
    task: str = "arith"  # arith[:digits], countdown[:n], rg:<dataset>, digits, shapes, grounding[:pair]
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    n: int = 200  # held-out prompts
    k: int = 1  # pass@k (k > 1 samples n_samples >= k responses per prompt)
    n_samples: int = 0  # samples per prompt for pass@k (0 = k)
    temperature: float = 1.0  # sampling temperature for pass@k
    max_new_tokens: int = 40  # generation length
    batch_size: int = 64  # prompts per generation batch
    seed: int = 0  # seed of the held-out split and of sampling
    threads: int = 2  # torch CPU threads
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N
    env: str = ""  # greedy episodes in an environment instead of --task: calc, guess, python, zoom, file.py:Class
    max_turns: int = 4  # --env: model turns per episode at most (--max-new-tokens: each turn's limit)
    max_episode_tokens: int = 0  # --env: tokens after the opening, turns and replies together (0 = turns x limit)
    tool_timeout_s: float = 10.0  # --env: a tool call, reset or step running longer is a counted fault


def run(cfg: Config) -> EvalResult:
    """`mirl eval`: load the model, evaluate it on the task's (or --env's) held-out split, print one JSON line."""
    import json

    from .data.collate import prompts_that_fit, too_long_message
    from .data.tasks import make_task
    from .models import load_policy
    from .options import check_config
    from .recipes.common import reward_model_note

    check_config(cfg)
    torch.set_num_threads(max(1, cfg.threads))
    reward_model_note(cfg.model, "--model")
    from .device import resolve_device

    policy = load_policy(cfg.model, seed=cfg.seed, revision=cfg.model_revision).to(resolve_device(cfg.device))
    if cfg.env:  # success rate, mean turns, tool calls and faults per episode (envs/task.py)
        from .envs.task import EnvTask

        task = EnvTask.of(cfg, policy.tokenizer)
    else:
        task = make_task(cfg.task, policy.tokenizer, cfg.chat)
    examples = task.examples("test", cfg.n, cfg.seed)
    _, too_long = prompts_that_fit(policy, examples, cfg.max_new_tokens)
    if too_long:  # every held-out prompt is scored, or the accuracy would be of another set
        hint = "lower --max-new-tokens"
        raise ValueError(too_long_message(too_long, len(examples), policy, cfg.max_new_tokens, hint))
    res = evaluate(
        policy,
        task,
        examples,
        max_new_tokens=cfg.max_new_tokens,
        k=cfg.k,
        n_samples=cfg.n_samples or None,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    print(json.dumps({"model": cfg.model, "task": task.name, **res.as_dict()}))
    return res
