"""Whether sharing the prompt pays in a GRPO update (issue 29, part 2): the forward + backward of smol-grpo-64's
batch (SmolLM2-135M's shape, random weights; 2 prompts x 8 rows, 32 prompt + 64 response tokens) as mirl's update
does it (every row recomputes its prompt), against one prefix forward per prompt whose keys and values the 8 rows
reuse (transformers' cache, repeated per row; gradients reach the prompt through them).

    python bench/prefix_share.py [--threads 2] [--repeats 3] [--prompts 2] [--group 8] [--prompt 32] [--new 64]

Prints the CPU line, both times (median of the repeats, after a warm-up), their ratio, and the largest
differences of the response log-probs and of the gradients (the two must compute the same thing). Run it alone.
Both are timed without activation checkpointing (transformers turns the cache off under it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "mirl-bench"))  # bench/run.py's folders
    args = ap.parse_args(argv)

    import torch
    from run import build, print_cpu
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(build("smol-grpo-64", Path(args.root))), dtype=torch.float32)
    model.train()
    p, g, lp, ln = args.prompts, args.group, args.prompt, args.new
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 8000, (p, lp), generator=gen)
    ids = torch.cat([prompts.repeat_interleave(g, 0), torch.randint(2, 8000, (p * g, ln), generator=gen)], 1)
    targets = ids[:, lp:]

    def logps(logits):  # logits predicting the response tokens -> their log-probs (rows, ln)
        return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]

    def full():
        return logps(model(ids).logits[:, lp - 1 : -1])

    def shared():
        out = model(prompts, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(g)  # each prompt's keys and values for its g rows (differentiable)
        first = out.logits[:, -1:].repeat_interleave(g, 0)  # the first response token's logits
        pos = torch.arange(lp, lp + ln - 1)[None].expand(p * g, -1)
        rest = model(ids[:, lp:-1], past_key_values=cache, position_ids=pos).logits
        return logps(torch.cat([first, rest], 1))

    def step(fn):
        model.zero_grad(set_to_none=True)
        lp_ = fn()
        lp_.sum().backward()
        return lp_.detach(), [q.grad.clone() for q in model.parameters() if q.grad is not None][:4]

    (a, ga), (b, gb) = step(full), step(shared)
    diff = float((a - b).abs().max())
    gdiff = max(float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)) for x, y in zip(ga, gb))

    def median_s(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            step(fn)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_full, t_shared = median_s(full), median_s(shared)
    print_cpu()
    print(f"threads {args.threads}; {p} prompts x {g} rows, {lp} prompt + {ln} response tokens; forward + backward")
    print(f"every row recomputes its prompt: {t_full:.2f} s; one prefix per prompt, shared: {t_shared:.2f} s "
          f"({t_full / t_shared:.2f}x); response log-probs within {diff:.1e}, gradients within {gdiff:.1e} "
          f"(relative)")  # fmt: skip


if __name__ == "__main__":
    main()
