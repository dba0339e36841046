"""Sample a group of responses per prompt and score them: the step every online recipe begins with."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ..data.formats import DataError
from .sample import RolloutBatch, generate


@dataclass
class ScoredBatch:
    """A rollout with its rewards (NaN where no function applied), per-function scores and metrics."""

    batch: RolloutBatch
    examples: list[dict]  # one per row (prompt's example repeated group_size times)
    rewards: torch.Tensor  # (B,) float64, NaN where no reward function applied
    per_fn: torch.Tensor  # (B, F)
    metrics: dict
    gen_s: float
    score_s: float


def completion_rows(scored: ScoredBatch, reward_names: list[str], n: int) -> list[dict]:
    """The first n rows of a scored rollout as loggable records: the prompt (its question when it has one), the
    completion, the total reward, the reward of each function (None where it did not apply), the reference
    answer and the prompt's images. One row per prompt first (the first sample of each group), then more."""
    seen: dict[int, int] = {}
    rank = []
    for i, p in enumerate(scored.batch.prompt_index.tolist()):
        rank.append((seen.get(p, 0), i))
        seen[p] = seen.get(p, 0) + 1
    rows = []
    for _, i in sorted(rank)[:n]:
        e = scored.examples[i]
        total = float(scored.rewards[i])
        per = {name: float(v) for name, v in zip(reward_names, scored.per_fn[i].tolist())}
        rows.append(
            {
                "prompt": e.get("question") or e["prompt"],
                "completion": scored.batch.texts[i],
                "reward": None if total != total else total,
                "rewards": {k: (None if v != v else v) for k, v in per.items()},
                "answer": e.get("answer") if e.get("answer") is not None else e.get("solution"),
                "images": e.get("images"),
            }
        )
    return rows


def check_reward_columns(reward_set, examples: list[dict], source: str) -> None:
    """Every column a reward function requires (a parameter without a default) must be in every example."""
    import inspect

    for name, fn, _ in reward_set.fns:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        need = [
            p.name for p in list(params)[2:] if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        need += list(getattr(fn, "required_columns", ()))  # the task reward: the fields its score() reads
        for col in need:
            for i, ex in enumerate(examples):
                if col not in ex or ex[col] is None:
                    where = ex.get("where", f"{source} row {i}")
                    raise DataError(
                        f"{where}: reward {name!r} needs the field {col!r}, which this row lacks "
                        f"(row has: {', '.join(sorted(k for k in ex if k != 'where'))})"
                    )


def encode_prompts(policy, examples: list[dict]) -> tuple[list[list[int]], list | None]:
    """Prompt token ids and image inputs (None when no example has images) of task or data records."""
    enc = [
        policy.encode_prompt(e["prompt"], e.get("images"), e.get("where", f"prompt {i}"), e.get("image_base", ""))
        for i, e in enumerate(examples)
    ]
    images = [im for _, im in enc]
    return [ids for ids, _ in enc], (images if any(im is not None for im in images) else None)


def noisy_sample_images(
    policy,
    examples: list[dict],
    clean: list,
    group_size: int,
    n_noisy: int,
    strength: float,
    rng: random.Random,
    kinds: tuple[str, ...] = ("crop", "noise"),
) -> list:
    """NoisyRollout: per row, the image inputs to sample from; the last n_noisy rows of each group see a
    perturbed copy of the prompt's images (models/vision.py perturb), the others the prompt's clean
    inputs `clean` (one per example, already encoded)."""
    from ..models.vision import load_image, perturb

    out = []
    for i, e in enumerate(examples):
        where, base = e.get("where", f"prompt {i}"), e.get("image_base", "")
        out += [clean[i]] * (group_size - n_noisy)
        for _ in range(n_noisy):
            imgs = e.get("images")
            if imgs:
                imgs = [perturb(load_image(x, where, base).convert("RGB"), strength, rng, kinds) for x in imgs]
            out.append(policy.encode_prompt(e["prompt"], imgs, where, base)[1])
    return out


def raw_example_images(examples: list[dict]) -> list:
    """Each example's images as RGB PIL images (None for a text example), for engines that encode them."""
    from ..models.vision import load_image

    out = []
    for i, e in enumerate(examples):
        where, base = e.get("where", f"prompt {i}"), e.get("image_base", "")
        imgs = e.get("images") or []
        out.append([load_image(x, f"{where} image {j}", base).convert("RGB") for j, x in enumerate(imgs)] or None)
    return out


def rollout_and_score(
    policy,
    examples: list[dict],
    reward_set,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator=None,
    ignore_eos: bool = False,
    noisy=None,
    step: int = 0,
    seeds=None,
    engine=None,
) -> ScoredBatch:
    """Sample group_size responses per example and score them. noisy: a NoisyRollout (rollout/groups.py),
    whose perturbed images some rows are sampled from at `step`; the batch keeps the clean images for the
    update. seeds: per-row sampling noise (row_seeds). engine: what samples (rollout/engine.py; default
    mirl's own sampler on `policy`)."""
    from .engine import LocalEngine, SamplingSettings

    t0 = time.perf_counter()
    engine = engine or LocalEngine(policy)
    prompts, images = encode_prompts(policy, examples)
    sample_images = None
    if noisy is not None and images is not None:
        sample_images = noisy.sample_images(policy, examples, images, group_size, step)
    raw_images = raw_example_images(examples) if engine.needs_raw_images and images is not None else None
    batch = engine.generate(
        prompts,
        group_size,
        SamplingSettings(max_new_tokens, temperature, top_p, top_k, ignore_eos),
        images=images,
        raw_images=raw_images,
        sample_images=sample_images,
        generator=generator,
        seeds=seeds,
    )
    t1 = time.perf_counter()
    rows = [e for e in examples for _ in range(group_size)]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "where", "image_base")}
    columns["example"] = rows
    columns["completion_lengths"] = batch.response_mask.sum(1).tolist()
    columns["max_completion_length"] = max_new_tokens
    prompts_ = [r["prompt"] for r in rows]
    rewards, per_fn, metrics = reward_set.score(prompts_, batch.texts, device=batch.prompt_ids.device, **columns)
    empty = sum(1 for t in batch.texts if not t.strip())
    metrics["completions/empty"] = float(empty)
    return ScoredBatch(batch, rows, rewards, per_fn, metrics, t1 - t0, time.perf_counter() - t1)


@dataclass
class UpdateBatch:
    """The rows an update trains on, from one or more rollouts: prompts left-padded, responses right-padded
    after them, so that the last R positions are the response area.

        ids, attn    (B, P + R)   token ids and attention mask
        resp_mask    (B, R)       1 on response tokens
        old_logps    (B, R)       the sampler's log-probs of the response tokens (0 off the mask)
        truncated    (B,)         the response hit max_new_tokens without ending
        images       per-row image inputs (None for text rows), or None when no row has images
    """

    ids: torch.Tensor
    attn: torch.Tensor
    resp_mask: torch.Tensor
    old_logps: torch.Tensor
    truncated: torch.Tensor
    images: list | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def n_resp(self) -> int:
        """R, the width of the response area."""
        return self.resp_mask.shape[1]

    def row_images(self, rows=None) -> dict | None:
        """The batched image inputs of `rows` (all rows when None), in row order; None for text."""
        from ..models.vision import select_images

        return select_images(self.images, range(len(self)) if rows is None else rows)

    def metrics(self, adv: torch.Tensor) -> dict:
        """The batch's diagnostics with its advantages (B,) or (B, R): advantage statistics (over response
        tokens for token advantages), response lengths, the truncated fraction."""
        lengths = self.resp_mask.sum(1).float()
        adv = adv[self.resp_mask.bool()] if adv.dim() == 2 else adv
        return {
            "advantages/mean": float(adv.mean()),
            "advantages/std": float(adv.std()),
            "advantages/max": float(adv.max()),
            "advantages/min": float(adv.min()),
            "completions/mean_length": float(lengths.mean()),
            "completions/truncated_frac": float(self.truncated.float().mean()),
        }

    def select(self, rows) -> UpdateBatch:
        """The rows `rows` (indices), images included."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        images = None if self.images is None else [self.images[int(i)] for i in idx]
        return UpdateBatch(
            self.ids[idx],
            self.attn[idx],
            self.resp_mask[idx],
            self.old_logps[idx],
            self.truncated[idx],
            images if images and any(images) else None,
        )


def pack_rows(rows: list[tuple[RolloutBatch, int]], pad_id: int) -> UpdateBatch:
    """Rows (rollout, index) from one or more rollouts -> one UpdateBatch (their concatenation, re-padded), on
    the rollouts' device: one host read of each rollout's lengths, then copies between device tensors. An
    episode's environment tokens are attended to but out of resp_mask (the loss mask)."""
    device = rows[0][0].prompt_ids.device
    lengths = {}  # id(rollout) -> (prompt lengths, response lengths), host lists
    for b, _ in rows:
        if id(b) not in lengths:
            lengths[id(b)] = torch.stack([b.prompt_mask.sum(1), b.response_mask.sum(1)]).tolist()
    sizes = [(lengths[id(b)][0][i], lengths[id(b)][1][i]) for b, i in rows]
    pw = max(p for p, _ in sizes)
    rw = max(1, max(r for _, r in sizes))
    bsz = len(rows)
    ids = torch.full((bsz, pw + rw), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((bsz, pw + rw), dtype=torch.long, device=device)
    resp = torch.zeros((bsz, rw), dtype=torch.long, device=device)
    old = torch.zeros((bsz, rw), device=device)
    for k, ((b, i), (p, r)) in enumerate(zip(rows, sizes)):
        ids[k, pw - p : pw] = b.prompt_ids[i, b.prompt_ids.shape[1] - p :]  # prompts are left-padded
        ids[k, pw : pw + r] = b.response_ids[i, :r]
        old[k, :r] = b.logps[i, :r]
        attn[k, pw - p : pw + r] = 1
        resp[k, :r] = 1 if b.action_mask is None else b.action_mask[i, :r]  # episodes: the model's tokens only
    truncated = torch.stack([b.truncated[i] for b, i in rows])
    images = [None if b.images is None else b.images[i] for b, i in rows]
    return UpdateBatch(ids, attn, resp, old, truncated, images if any(images) else None)


def completions(
    policy,
    prompts: list[str],
    *,
    max_new_tokens: int,
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    images: list | None = None,
) -> list[list[str]]:
    """`samples` decoded responses per prompt (greedy at temperature 0). images: per prompt, its images
    (paths or PIL images) or None."""
    g = torch.Generator(device=policy.device).manual_seed(seed)
    records = [
        {"prompt": p, "images": None if images is None else images[i], "where": f"prompt {i}"}
        for i, p in enumerate(prompts)
    ]
    out: list[list[str]] = []
    for s in range(0, len(prompts), batch_size):
        chunk, chunk_images = encode_prompts(policy, records[s : s + batch_size])
        batch = generate(
            policy,
            chunk,
            max_new_tokens=max_new_tokens,
            samples_per_prompt=samples,
            temperature=temperature,
            generator=g,
            images=chunk_images,
        )
        out.extend(batch.texts[i * samples : (i + 1) * samples] for i in range(len(chunk)))
    return out
