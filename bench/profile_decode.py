"""Where a decode step's time goes: mirl's generation of one smol-grpo-64 rollout (SmolLM2-135M's shape with random
weights, 16 rows x 64 new tokens, greedy, ignore_eos) under torch.profiler, per operation and input shapes, with each
one's share of the decode steps and the bound the step could reach (float32 weights and the rows' keys and values
read once per step at the measured copy bandwidth; the matmul FLOPs at the measured peak).

    python bench/profile_decode.py [--threads 2] [--new-tokens 64] [--top 15]

Prints the CPU line (name, ATen kernels, BLAS), the mean decode step against its bound, and the top operations. Run
it alone: every figure is a timing. The model folder is the bench's (bench/run.py's build, under its --root).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "mirl-bench"))  # bench/run.py's folders
    args = ap.parse_args(argv)

    import torch
    from run import WORKLOADS, build, copy_bandwidth, matmul_peak, print_cpu
    from torch.profiler import ProfilerActivity, profile

    from mirl.models import load_policy
    from mirl.rollout.sample import generate

    torch.set_num_threads(args.threads)
    w = WORKLOADS["smol-grpo-64"]
    folder = build("smol-grpo-64", Path(args.root))
    policy = load_policy(str(folder))
    cfg = policy.model.config
    n = w["prompts"] * w["group"]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 8000, (w["prompts"], w["prompt"]), generator=g).tolist()
    gen = lambda k: generate(policy, prompts, max_new_tokens=k, samples_per_prompt=w["group"], temperature=0.0,
                             ignore_eos=True)  # fmt: skip

    gen(4)  # warm-up: allocations, the weight snapshot's first build
    t0 = time.perf_counter()
    gen(1)  # the prefill and one token: subtracted to leave the decode steps
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen(args.new_tokens)
    total_s = time.perf_counter() - t0
    step_s = (total_s - prefill_s) / (args.new_tokens - 1)

    params = sum(p.numel() for p in policy.model.parameters())
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    ctx = w["prompt"] + args.new_tokens // 2  # the mean context of the decode steps
    bw, peak = copy_bandwidth(args.threads), matmul_peak(args.threads, "float32")
    bound_s = max(4 * (params + n * ctx * kv) / bw, 2 * params * n / peak)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        gen(args.new_tokens)
    print_cpu()
    print(f"threads {args.threads}; {n} rows x {args.new_tokens} new tokens after a {w['prompt']}-token prompt")
    print(f"decode step: {1e3 * step_s:.1f} ms; bound {1e3 * bound_s:.1f} ms ({100 * bound_s / step_s:.0f}% of it):"
          f" {4 * params / 1e6:.0f} MB of float32 weights at {bw / 1e9:.1f} GB/s, {2 * params * n / 1e9:.1f} GFLOP at"
          f" {peak / 1e9:.0f} GFLOP/s; prefill + 1 token {prefill_s:.2f} s")  # fmt: skip
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("\n| op | input shapes | calls | self ms | share |\n|---|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        shapes = str(e.input_shapes)[:70]
        print(f"| {e.key} | {shapes} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
