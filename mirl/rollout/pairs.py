"""Preference pairs from a policy's own samples: K responses per prompt, verified by the task.

Correct responses are chosen, incorrect ones rejected (docs/algorithms.md §3: positives and negatives from the
model itself). A prompt whose K samples all agree gives no pair; it is counted, not lost silently.
"""

from __future__ import annotations

import random

from ..rollout.score import completions


def verified_samples(
    policy,
    task,
    examples: list[dict],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    threshold: float = 1.0,
) -> list[tuple[list[str], list[str], int]]:
    """The one "sample K, verify, split" step: k responses per example (batch_size rows per generation batch),
    each scored by the task's verifier -> per example (the responses scoring >= threshold, the others that are
    not empty, the number of empty responses: never a rejected one, counted instead)."""
    images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
    samples = completions(
        policy,
        [e["prompt"] for e in examples],
        max_new_tokens=max_new_tokens,
        samples=k,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        images=images,
    )
    out = []
    for ex, outs in zip(examples, samples):
        scores = [task.score(o, ex) for o in outs]
        good = [o for o, s in zip(outs, scores) if s >= threshold]
        bad = [o for o, s in zip(outs, scores) if s < threshold and o.strip()]
        out.append((good, bad, sum(1 for o in outs if not o.strip())))
    return out


def sample_pairs(
    policy,
    task,
    examples: list[dict],
    *,
    k: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 40,
    pairs_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[list[dict], dict]:
    """-> (pairs [{'prompt', 'chosen', 'rejected', 'where'}], stats)."""
    if k < 2:
        raise ValueError(f"sampling preference pairs needs k >= 2 samples per prompt, got {k}")
    rng = random.Random(seed)
    split = verified_samples(
        policy,
        task,
        examples,
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=max(1, batch_size // k),
    )
    pairs, all_correct, all_wrong, n_correct, empty = [], 0, 0, 0, 0
    for i, (ex, (good, bad, n_empty)) in enumerate(zip(examples, split)):
        empty += n_empty
        n_correct += len(good)
        if not good:
            all_wrong += 1
            continue
        if not bad:
            all_correct += 1
            continue
        for _ in range(pairs_per_prompt):
            pairs.append(
                {
                    "prompt": ex["prompt"],
                    "chosen": rng.choice(good),
                    "rejected": rng.choice(bad),
                    "images": ex.get("images"),
                    "where": f"{task.name} sampled prompt #{i}",
                }
            )
    stats = {
        "prompts": len(examples),
        "pairs": len(pairs),
        "skipped_all_correct": all_correct,
        "skipped_all_wrong": all_wrong,
        "empty_samples": empty,
        "sample_accuracy": n_correct / max(1, k * len(examples)),
    }
    return pairs, stats
