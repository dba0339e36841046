"""Accuracy, mean@N with its standard error, pass@k and maj@k of a policy on a task's held-out split, a standard
benchmark (data/benchmarks.py) or any question-answer dataset, scored by the task's verifier.

accuracy  greedy decoding, fraction scored correct (score >= the task's success threshold, 1 by default;
          grounding: IoU >= 0.5), with its standard error, and the mean score (grounding: mean IoU); grounding
          also says where the greedy boxes land (boxes/on_target, on_other, off_shapes, no_box, iou_on_target)
mean@N    N samples per prompt at `temperature` (--n-samples N): the mean over prompts of each prompt's fraction
          correct, with its standard error over prompts: the sample standard deviation (n - 1) of the per-prompt
          fractions over sqrt(prompts). (The greedy accuracy's standard error is the same formula over 0/1 scores.)
pass@k    n >= k samples per prompt, the unbiased estimator of Chen et al. 2021:
          pass@k = mean over prompts of 1 - C(n - c, k) / C(n, k), c = correct samples
maj@k     the majority answer of a prompt's first k samples (answers counted alike by data/benchmarks.answer_key,
          a tie to the answer given first) scored; the mean over prompts (tasks that extract an answer)

mirl eval --model runs/sft/final --task arith --k 8
mirl eval --model HuggingFaceTB/SmolLM2-135M-Instruct --benchmark gsm8k --n-samples 8 --k 8 --max-new-tokens 512 \
    --predictions gsm8k.jsonl
mirl eval --model runs/sft/final --data questions.jsonl --question-column q --answer-column a
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import comb, sqrt

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


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """The mean of per-item values and its standard error, the sample standard deviation (n - 1) over sqrt(n);
    None under two items.

    >>> mean_and_se([1.0, 0.5, 0.0])
    (0.5, 0.28867513459481287)
    """
    n = len(values)
    if n == 0:
        return 0.0, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, sqrt(var / n)


def majority_vote(answers: list, correct: list[bool]) -> bool:
    """Whether the most common answer (answers counted alike by answer_key; a tie to the one given first) is
    correct; no answer at all is not.

    >>> majority_vote(["3", "4", "4.0", None], [False, True, True, False])
    True
    """
    from .data.benchmarks import answer_key

    counts: dict = {}
    for i, a in enumerate(answers):
        key = answer_key(a)
        if key is not None:
            counts.setdefault(key, [0, i])[0] += 1
    if not counts:
        return False
    _, first = max(counts.values(), key=lambda c: (c[0], -c[1]))
    return bool(correct[first])


@dataclass
class EvalResult:
    """Held-out accuracy, pass@k, the mean score and a few samples of one evaluation; with samples per prompt,
    mean@N (and maj@k) too; per-item predictions for --predictions."""

    accuracy: float
    pass_at_k: float | None
    k: int
    n: int
    samples: list[tuple[str, str, float]]  # (prompt, greedy completion, score), a few for reports
    mean_score: float = 0.0  # mean task score (grounding: mean IoU)
    details: dict | None = None  # the task's breakdown of the greedy answers, if it has one (grounding)
    accuracy_se: float | None = None  # the greedy accuracy's standard error over prompts
    n_samples: int = 0  # samples per prompt (0: greedy only)
    mean_at_n: float | None = None  # mean over prompts of the fraction of the n_samples samples correct
    mean_at_n_se: float | None = None  # its standard error over prompts
    maj_at_k: float | None = None  # majority vote of the first k samples
    predictions: list[dict] = field(default_factory=list, repr=False)  # per item, for --predictions

    def as_dict(self) -> dict:
        """The numbers as a JSON-able dict (mean@N, pass@k and maj@k under their names)."""
        d = {"accuracy": self.accuracy, "accuracy_se": self.accuracy_se, "mean_score": self.mean_score, "n": self.n}
        d.update(self.details or {})
        if self.n_samples:
            d[f"mean@{self.n_samples}"] = self.mean_at_n
            d[f"mean@{self.n_samples}_se"] = self.mean_at_n_se
        if self.pass_at_k is not None:
            d[f"pass@{self.k}"] = self.pass_at_k
        if self.maj_at_k is not None:
            d[f"maj@{self.k}"] = self.maj_at_k
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
    """Greedy accuracy on `examples` by the task's verifier, with its standard error; when k > 1 or n_samples,
    n_samples (default k) samples per prompt: mean@N with its standard error, pass@k and maj@k (k > 1)."""
    if hasattr(task, "evaluate_policy"):  # an environment (envs/task.py): greedy multi-turn episodes
        if k > 1 or n_samples:
            raise ConfigError("--k > 1 and --n-samples are not supported with --env yet: evaluate greedy episodes")
        r = task.evaluate_policy(policy, examples, max_new_tokens=max_new_tokens)
        acc, acc_se = mean_and_se([float(v > 0) for v in r["rewards"]])
        return EvalResult(acc, None, 1, len(examples), r["samples"], r["mean_score"], r["details"], accuracy_se=acc_se)
    prompts = [e["prompt"] for e in examples]
    images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
    success = getattr(task, "success_threshold", 1.0)
    extract = getattr(task, "extract", lambda c: None)
    greedy = completions(policy, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, images=images)
    scores = [task.score(c[0], e) for c, e in zip(greedy, examples)]
    acc, acc_se = mean_and_se([float(s >= success) for s in scores])
    res = EvalResult(acc, None, k, len(examples), [], sum(scores) / max(1, len(scores)), accuracy_se=acc_se)
    res.samples = [(p, c[0], s) for p, c, s in list(zip(prompts, greedy, scores))[:8]]
    res.details = task.breakdown([c[0] for c in greedy], examples) if hasattr(task, "breakdown") else None
    res.predictions = [
        {"prompt": e["prompt"], "reference": e.get("answer"), "completions": c,
         "extracted": [extract(c[0])], "scores": [s]}
        for e, c, s in zip(examples, greedy, scores)
    ]  # fmt: skip
    if k > 1 or n_samples:
        res.n_samples = n = n_samples or k
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
        sampled_scores = [[task.score(c, e) for c in cs] for cs, e in zip(sampled, examples)]
        right = [[s >= success for s in ss] for ss in sampled_scores]
        res.mean_at_n, res.mean_at_n_se = mean_and_se([sum(r) / n for r in right])
        answers = [[extract(c) for c in cs] for cs in sampled]
        if k > 1:
            res.pass_at_k = sum(pass_at_k(n, sum(r), k) for r in right) / max(1, len(right))
            if hasattr(task, "extract"):
                res.maj_at_k = sum(majority_vote(a[:k], r[:k]) for a, r in zip(answers, right)) / max(1, len(right))
        for p, cs, a, ss in zip(res.predictions, sampled, answers, sampled_scores):
            p.update(greedy_completion=p["completions"][0], greedy_extracted=p["extracted"][0],
                     greedy_score=p["scores"][0], completions=cs, extracted=a, scores=ss)  # fmt: skip
    return res


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
    benchmark: str = ""  # a benchmark instead of --task: gsm8k, math500, aime24, aime25, amc23 (NAME:LOCAL_COPY)
    data: str = ""  # question-answer data instead of --task: .jsonl, .parquet, a datasets folder or a hub id
    question_column: str = "question"  # --data: the column holding the question
    answer_column: str = "answer"  # --data: the column holding the reference answer
    split: str = ""  # the split of --data (a datasets folder or hub dataset; "" = test)
    data_config: str = ""  # the configuration (subset) of a hub dataset --data
    revision: str = ""  # the hub revision (branch, tag, commit) of a hub dataset --data
    chat: str = choice("auto", "yes", "no")  # built-in task through the model's chat template (auto: if it has one)
    n: int = 0  # held-out prompts (0 = 200 of a task, every item of --benchmark or --data, in their order)
    k: int = 1  # pass@k and maj@k (k > 1 samples n_samples >= k responses per prompt)
    n_samples: int = 0  # samples per prompt: mean@N with its standard error, and pass@k (0 = k when k > 1, else none)
    temperature: float = 1.0  # sampling temperature of --n-samples and pass@k
    max_new_tokens: int = 40  # generation length
    batch_size: int = 64  # prompts per generation batch
    seed: int = 0  # seed of the held-out split and of sampling
    predictions: str = ""  # write each prompt's completions, extracted answers and scores to this JSONL file
    threads: int = 2  # torch CPU threads
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N
    env: str = ""  # greedy episodes in an environment instead of --task: calc, guess, python, zoom, file.py:Class
    max_turns: int = 4  # --env: model turns per episode at most (--max-new-tokens: each turn's limit)
    max_episode_tokens: int = 0  # --env: tokens after the opening, turns and replies together (0 = turns x limit)
    tool_timeout_s: float = 10.0  # --env: a tool call, reset or step running longer is a counted fault
    frame_order: str = choice("as-is", "reversed", "shuffled")  # each clip's frames as they are, reversed or shuffled


def prompt_source(cfg: Config):
    """The prompts of `mirl eval`, read before any model is loaded (a benchmark that cannot be had fails first):
    --benchmark's, --data's or --task's task in its plain form (None with --env, which needs the tokenizer)."""
    if cfg.benchmark:
        from .data.benchmarks import benchmark_task

        return benchmark_task(cfg.benchmark)
    if cfg.data:
        from .data.benchmarks import dataset_task

        return dataset_task(cfg.data, question=cfg.question_column, answer=cfg.answer_column, split=cfg.split,
                            config=cfg.data_config, revision=cfg.revision)  # fmt: skip
    if cfg.env:
        return None
    from .data.tasks import make_task

    return make_task(cfg.task)


def check_sources(cfg: Config) -> None:
    """One source of held-out prompts: --task, --benchmark, --data or --env."""
    given = [f for f, v in (("--benchmark", cfg.benchmark), ("--data", cfg.data), ("--env", cfg.env)) if v]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are two sources of prompts to evaluate on: give one")
    if given and cfg.task != Config.task:
        raise ConfigError(f"--task {cfg.task!r} has no effect with {given[0]}, which gives the prompts (drop one)")


def write_predictions(path: str, predictions: list[dict]) -> None:
    """One JSON line per prompt: the prompt, the reference, the completions, their extracted answers and scores."""
    from pathlib import Path

    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with open(Path(path).expanduser(), "w") as f:
        for i, p in enumerate(predictions):
            f.write(json.dumps({"index": i, **p}) + "\n")


def run(cfg: Config) -> EvalResult:
    """`mirl eval`: load the model, evaluate it on the task's (--benchmark's, --data's, --env's) held-out split,
    print one JSON line (and write --predictions)."""
    from .data.collate import prompts_that_fit, too_long_message
    from .models import load_policy
    from .options import check_config
    from .recipes.common import reward_model_note

    check_config(cfg)
    check_sources(cfg)
    torch.set_num_threads(max(1, cfg.threads))
    reward_model_note(cfg.model, "--model")
    from .device import resolve_device

    source = prompt_source(cfg)
    policy = load_policy(cfg.model, seed=cfg.seed, revision=cfg.model_revision).to(resolve_device(cfg.device))
    if cfg.env:  # success rate, mean turns, tool calls and faults per episode (envs/task.py)
        from .envs.task import EnvTask

        task = EnvTask.of(cfg, policy.tokenizer)
    else:  # asked as the model should be: through its chat template when it has one (--chat)
        from .data.tasks import chat_task

        task = chat_task(source, policy.tokenizer, cfg.chat)
    examples = task.examples("test", cfg.n or (0 if cfg.benchmark or cfg.data else 200), cfg.seed)
    if cfg.frame_order != "as-is":
        from .rollout.temporal import has_video, reordered_example

        if not any(has_video(ex) for ex in examples):
            raise ConfigError(
                f"--frame-order {cfg.frame_order} has no effect: no prompt has a clip of 2 or more frames"
            )
        examples = [reordered_example(ex, cfg.frame_order, cfg.seed) for ex in examples]
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
    if cfg.predictions:
        write_predictions(cfg.predictions, res.predictions)
    order = {} if cfg.frame_order == "as-is" else {"frame_order": cfg.frame_order}
    print(json.dumps({"model": cfg.model, "task": task.name, **order, **res.as_dict()}))
    return res
