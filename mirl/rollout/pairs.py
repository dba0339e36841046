"""Preference pairs from a policy's own samples: K responses per prompt, verified by the task.

Correct responses are chosen, incorrect ones rejected (docs/algorithms.md §3: positives and negatives from the
model itself). A prompt whose K samples all agree gives no pair; it is counted, not lost silently.
"""

from __future__ import annotations

import random

from ..rollout.score import completions


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
    images = [e.get("images") for e in examples] if any(e.get("images") for e in examples) else None
    samples = completions(
        policy,
        [e["prompt"] for e in examples],
        max_new_tokens=max_new_tokens,
        samples=k,
        temperature=temperature,
        batch_size=max(1, batch_size // k),
        seed=seed,
        images=images,
    )
    pairs, all_correct, all_wrong, n_correct, empty = [], 0, 0, 0, 0
    for i, (ex, outs) in enumerate(zip(examples, samples)):
        empty += sum(1 for o in outs if not o.strip())  # never a rejected response: counted instead
        good = [o for o in outs if task.score(o, ex) >= 1.0]
        bad = [o for o in outs if task.score(o, ex) < 1.0 and o.strip()]
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
