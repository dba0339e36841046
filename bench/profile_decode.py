"""Where a decode step's time goes: mirl's generation of one smol-grpo-64 rollout (SmolLM2-135M's shape with random
weights, 16 rows x 64 new tokens, greedy, ignore_eos) under torch.profiler, per operation and input shapes, with each
one's share of the decode steps and the bound the step could reach (float32 weights and the rows' keys and values
read once per step at the measured copy bandwidth; the matmul FLOPs at the measured peak).

    python bench/profile_decode.py [--threads 2] [--new-tokens 64] [--top 15] [--products auto,matmul]
    python bench/profile_decode.py --gemm      # the step's matrix products alone: MKL (x @ W, as the step does)
                                               # against oneDNN with a prepacked weight, per shape
    python bench/profile_decode.py --stream    # the products as a real step meets them (every layer's weights
                                               # distinct, streamed from memory) against the read bandwidth and
                                               # the arithmetic peak, on 1 thread and on --threads

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
    ap.add_argument("--products", default="auto,matmul",
                    help="the decode products' library, each timed in turn: auto (this CPU's choice, mirl/cpu.py), "
                         "matmul (torch's, MKL on x86), onednn (every product prepacked)")  # fmt: skip
    ap.add_argument("--gemm", action="store_true", help="time the step's products alone, MKL against oneDNN")
    ap.add_argument("--stream", action="store_true", help="the products streamed from memory against the bounds")
    args = ap.parse_args(argv)

    import torch

    if args.gemm:
        return gemm_table(args.threads)
    if args.stream:
        return stream_table(args.threads)
    from run import WORKLOADS, build, copy_bandwidth, matmul_peak, print_cpu
    from torch.profiler import ProfilerActivity, profile

    import mirl.cpu
    from mirl.cpu import DecodeProducts
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

    params = sum(p.numel() for p in policy.model.parameters())
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    ctx = w["prompt"] + args.new_tokens // 2  # the mean context of the decode steps
    bw, peak = copy_bandwidth(args.threads), matmul_peak(args.threads, "float32")
    bound_s = max(4 * (params + n * ctx * kv) / bw, 2 * params * n / peak)
    print_cpu()
    print(f"threads {args.threads}; {n} rows x {args.new_tokens} new tokens after a {w['prompt']}-token prompt")
    print(f"decode step bound {1e3 * bound_s:.1f} ms: {4 * params / 1e6:.0f} MB of float32 weights at"
          f" {bw / 1e9:.1f} GB/s, {2 * params * n / 1e9:.1f} GFLOP at {peak / 1e9:.0f} GFLOP/s")  # fmt: skip
    choices = {"auto": mirl.cpu.decode_products(), "matmul": DecodeProducts(False, False, 0, "torch's matmul"),
               "onednn": DecodeProducts(True, True, 0, "oneDNN prepacked, every product")}  # fmt: skip
    for name in args.products.split(","):
        mirl.cpu.this_cpu_decode_products = lambda c=choices[name]: c  # what models/decode.py reads
        gen(4)  # warm-up: allocations, the weight snapshot's first build
        t0 = time.perf_counter()
        gen(1)  # the prefill and one token: subtracted to leave the decode steps
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen(args.new_tokens)
        step_s = (time.perf_counter() - t0 - prefill_s) / (args.new_tokens - 1)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            gen(args.new_tokens)
        print(f"\n### --products {name}: {choices[name].why}\n")
        print(f"decode step: {1e3 * step_s:.1f} ms, {100 * bound_s / step_s:.0f}% of the bound; prefill + 1 token"
              f" {prefill_s:.2f} s")  # fmt: skip
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events)
        print("\n| op | input shapes | calls | self ms | share |\n|---|---|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            shapes = str(e.input_shapes)[:70]
            print(f"| {e.key} | {shapes} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                  f"{100 * e.self_cpu_time_total / total:.1f}% |")  # fmt: skip


# SmolLM2-135M's decode products for 16 rows, (in, out) as models/decode.py stores them off x86: q k v fused, o,
# gate and up fused, down, the tied head over the whole vocabulary; the count is per decode step
GEMMS = [("qkv", 576, 960, 30), ("o", 576, 576, 30), ("gate+up", 576, 3072, 30), ("down", 1536, 576, 30),
         ("head", 576, 49152, 1)]  # fmt: skip


def gemm_table(threads: int, rows: int = 16, repeats: int = 50) -> None:
    """Median time of each product through torch.matmul (MKL sgemm on x86) and through oneDNN's linear with the
    weight prepacked once, their largest difference, and the step's total for each."""
    import statistics

    import torch
    from run import print_cpu

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    print_cpu()
    print(f"threads {threads}; {rows} rows\n\n| product | in x out | MKL us | oneDNN us | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    total = {"mkl": 0.0, "onednn": 0.0}

    def median_us(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e6 * statistics.median(times)

    for name, k, n, count in GEMMS:
        x = torch.randn(rows, k, generator=g)
        w = torch.randn(k, n, generator=g) / k**0.5  # (in, out)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), rows)
        mkl = lambda x=x, w=w: torch.matmul(x, w)
        onednn = lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        diff = float((mkl() - onednn()).abs().max())
        a, b = median_us(mkl), median_us(onednn)
        total["mkl"] += count * a
        total["onednn"] += count * b
        print(f"| {name} | {k} x {n} | {a:.0f} | {b:.0f} | {a / b:.2f}x | {diff:.1e} |")
    print(f"\nper decode step (x count): MKL {total['mkl'] / 1e3:.1f} ms, oneDNN {total['onednn'] / 1e3:.1f} ms")


def read_bandwidth(threads: int, mb: int = 256) -> float:
    """Bytes per second read by a sum over a large float32 tensor (no writes: what streaming weights needs)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(mb * 2**18)
    a.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def stream_table(threads: int, rows: int = 16) -> None:
    """Each decode product over as many distinct prepacked weights as the step has (30 layers; the head once), so
    that they stream from memory as in a real step, through oneDNN (the x86 choice, mirl/cpu.py): its time, the
    bytes it reads per second, and the two bounds it sits between: max(bytes / read bandwidth, FLOPs / peak) if
    reading and arithmetic overlapped fully, their sum if they did not."""
    import torch
    from run import copy_bandwidth, matmul_peak, print_cpu

    print_cpu()
    g = torch.Generator().manual_seed(0)
    weights = {
        name: [
            torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, generator=g) / k**0.5, rows) for _ in range(count)
        ]
        for name, k, n, count in GEMMS
    }
    for th in sorted({1, threads}):
        read, copy, peak = read_bandwidth(th), copy_bandwidth(th), matmul_peak(th, "float32")
        print(f"\n{th} thread(s): read {read / 1e9:.1f} GB/s (a sum), copy {copy / 1e9:.1f} GB/s (read + written),"
              f" float32 peak {peak / 1e9:.0f} GFLOP/s; {rows} rows\n")  # fmt: skip
        print("| product | in x out | x count | ms per step | GB/s read | overlapped bound ms | serial bound ms |")
        print("|---|---|---|---|---|---|---|")
        total = [0.0, 0.0, 0.0]  # measured, overlapped bound, serial bound (s per step)
        for name, k, n, count in GEMMS:
            x = torch.randn(rows, k, generator=g)
            run = lambda x=x, ws=weights[name]: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                                 for w in ws]  # fmt: skip
            run()
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t)
            nbytes, flops = 4 * k * n * count, 2 * rows * k * n * count
            over, serial = max(nbytes / read, flops / peak), nbytes / read + flops / peak
            total = [a + b for a, b in zip(total, (best, over, serial))]
            print(f"| {name} | {k} x {n} | {count} | {1e3 * best:.2f} | {nbytes / best / 1e9:.1f} | {1e3 * over:.2f} |"
                  f" {1e3 * serial:.2f} |")  # fmt: skip
        print(f"| all | | | {1e3 * total[0]:.1f} | | {1e3 * total[1]:.1f} | {1e3 * total[2]:.1f} |")


if __name__ == "__main__":
    main()
