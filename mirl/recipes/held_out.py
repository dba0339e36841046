"""Held-out evaluation, the same in every recipe: greedy accuracy, with its standard error, on the task's test
examples (or --eval-benchmark's items) before, during (--eval-every, --eval-every-s) and after training, recorded
with the training seconds and samples so far, and the samples and report page written at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path

from ..logging import console


def held_out_set(policy, task, test: list, *, benchmark: str, chat: str, n: int, max_new_tokens: int):
    """The held-out set: with --eval-benchmark, the benchmark's first n items (data/benchmarks.py), asked through the
    model's chat template as `mirl eval --benchmark` asks them, each checked to fit the model's context with
    max_new_tokens; else (or with n 0: no held-out set) the task's own. -> (the task that scores them, the examples)."""
    if not benchmark or not n:
        return task, test
    from ..data.benchmarks import benchmark_task
    from ..data.collate import prompts_that_fit, too_long_message

    bench = benchmark_task(benchmark, policy.tokenizer, chat, option="--eval-benchmark")
    test = bench.examples("test", n, 0)
    _, too_long = prompts_that_fit(policy, test, max_new_tokens)
    if too_long:
        hint = "lower --max-new-tokens or --eval-n (the benchmark's first items)"
        raise ValueError(f"--eval-benchmark {bench.name}: " + too_long_message(too_long, len(test), policy,
                                                                                max_new_tokens, hint))  # fmt: skip
    return bench, test


def held_out_evaluator(policy, task, test, *, run, evals: list | None = None, max_new_tokens: int):
    """evaluate(step, label=None) -> greedy held-out accuracy, recorded in run.evals (or `evals` before the
    run exists); None when there is no held-out set."""
    if not test:
        return None

    def evaluate(step: int, label: str | None = None) -> float:
        done = run.evals if run is not None else evals
        if done and done[-1]["step"] == step and step > 0:  # evaluated at this step already (--eval-every)
            console.print(
                f"held-out accuracy {label or f'at step {step}'}: {done[-1]['accuracy']:.3f} (as at step {step})"
            )
            return done[-1]["accuracy"]
        return held_out_accuracy(
            policy,
            task,
            test,
            max_new_tokens=max_new_tokens,
            evals=run.evals if run is not None else evals,
            step=step,
            label=label or f"at step {step}",
            run=run,
        )

    return evaluate


def held_out_accuracy(
    policy, task, test, *, max_new_tokens: int, evals: list, step: int, label: str, run=None
) -> float:
    """Greedy accuracy on the held-out examples and its standard error, appended to evals (with the training
    seconds so far, the samples drawn so far and the evaluation's own seconds) and printed. run None: before
    training."""
    import time

    from ..eval import evaluate

    t0 = time.perf_counter()
    train_s = 0.0 if run is None else run.train_seconds()
    res = evaluate(policy, task, test, max_new_tokens=max_new_tokens)
    acc = res.accuracy
    # an evaluation before training (run None) is outside the training clock: nothing to subtract
    evals.append(
        {
            "step": step,
            "accuracy": acc,
            "accuracy_se": res.accuracy_se,
            "mean_score": res.mean_score,
            "train_s": train_s,
            "samples": 0 if run is None else run.samples,
            "tokens": 0 if run is None else run.tokens,
            "eval_s": 0.0 if run is None else time.perf_counter() - t0,
            **(res.details or {}),
        }
    )
    se = f" ± {res.accuracy_se:.3f}" if res.accuracy_se is not None else ""
    console.print(f"held-out accuracy {label}: {acc:.3f}{se}, mean score {res.mean_score:.3f} (n={len(test)})")
    return acc


def last_evaluation(evals: list, n: int) -> dict:
    """A recipe's summary['eval']: the last held-out evaluation's accuracy, mean score and the task's breakdown,
    and n, the held-out examples it scored."""
    bookkeeping = ("step", "train_s", "samples", "tokens", "eval_s")
    return {**{k: v for k, v in evals[-1].items() if k not in bookkeeping}, "n": n}


def write_samples_and_report(
    out_dir, policy, task=None, examples: list[dict] | None = None, *, max_new_tokens: int, n_samples: int = 8
) -> None:
    """End of a run (rank 0): <out_dir>/samples.jsonl gets the greedy completions of a few held-out prompts with
    their task score (or of the first training prompts when there is no task), after the rollouts that
    --log-completions logged; then the report page."""
    from ..report import write_report
    from ..rollout.score import completions

    examples = (examples or [])[:n_samples]
    if examples:
        if hasattr(task, "evaluate_policy"):  # an environment: greedy episodes, the environment's parts marked
            done = task.evaluate_policy(policy, examples, max_new_tokens=max_new_tokens)["samples"]
            outs, scores = [[t] for _, t, _ in done], [r for _, _, r in done]
        else:
            images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
            outs = completions(policy, [e["prompt"] for e in examples], max_new_tokens=max_new_tokens, images=images)
            scores = [task.score(o[0], e) if task is not None else None for o, e in zip(outs, examples)]
        with open(Path(out_dir) / "samples.jsonl", "a") as f:  # after the rollouts logged during the run
            for e, o, score in zip(examples, outs, scores):
                row = {
                    "kind": "held-out",
                    "prompt": e.get("question") or e["prompt"],
                    "completion": o[0],
                    "reward": score,
                    "reference": e.get("solution") or e.get("chosen"),
                }
                f.write(json.dumps(row) + "\n")
    console.print(f"report: {write_report([out_dir])}")
