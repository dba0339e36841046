"""Side-by-side benchmark of mirl and TRL on identical weights, data, lengths, batch and threads.

    make bench                      # every workload, both libraries, alternating, table at the end
    python bench/run.py --only dpo-tiny --repeats 1

Each measurement runs in its own process (peak RSS is that process's), mirl and TRL alternate, and the
median step time after warm-up steps is reported. The model is a transformers Qwen2 (or, for the smol-*
workloads, a Llama of SmolLM2-135M's sizes) built from a config with random weights and saved once; both
libraries load that folder. A word-level tokenizer makes every word one token, so prompt and response
lengths are exact. The matmul peak (fp32 and bf16) and the copy bandwidth are measured in the same run with
the same thread count, and compute-bound workloads report achieved FLOP/s = 6 * parameters * tokens per
step / step time (forward + backward of the policy; the reference pass is extra work neither counts).

The limit column is what the hardware allows for the same work, measured in a third process per repeat:
for a preference step, the plain PyTorch forward + backward of the same batch on the same model (the
decoder over every position, the LM head and one cross-entropy loss on the response positions only, as
any DPO must; no reference pass, no optimizer); for a GRPO step, that forward + backward of the sampled
batch plus the roofline bound of decoding its tokens: each decode step takes at least the larger of
its FLOPs over the matmul peak and the bytes of weights and KV cache it reads over the copy bandwidth.
"mirl % of limit" is limit step time / mirl step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOL = dict(arch="llama", hidden=576, layers=30, heads=9, kv_heads=3, mlp=1536, vocab=8000, model_vocab=49152)

WORKLOADS = {
    # name: model config, pairs or prompts, lengths, threads
    "dpo-tiny": dict(
        kind="dpo",
        hidden=64,
        layers=2,
        heads=4,
        vocab=1000,
        batch=8,
        prompt=16,
        response=16,
        threads=1,
        steps=40,
        warmup=5,
    ),
    "dpo-large": dict(
        kind="dpo",
        hidden=512,
        layers=8,
        heads=8,
        vocab=8000,
        batch=8,
        prompt=128,
        response=128,
        threads=2,
        steps=4,
        warmup=1,
    ),
    # MIO on the DPO workloads (TRL has no MIO: its sigmoid loss runs beside it), same model folder and rows
    "mio-tiny": dict(
        kind="dpo",
        loss="mio",
        same_as="dpo-tiny",
        hidden=64,
        layers=2,
        heads=4,
        vocab=1000,
        batch=8,
        prompt=16,
        response=16,
        threads=1,
        steps=40,
        warmup=5,
    ),
    "mio-large": dict(
        kind="dpo",
        loss="mio",
        same_as="dpo-large",
        hidden=512,
        layers=8,
        heads=8,
        vocab=8000,
        batch=8,
        prompt=128,
        response=128,
        threads=2,
        steps=4,
        warmup=1,
    ),
    "grpo-128": dict(
        kind="grpo",
        hidden=64,
        layers=2,
        heads=4,
        vocab=1000,
        prompts=2,
        group=8,
        prompt=16,
        new_tokens=128,
        threads=1,
        steps=6,
        warmup=2,
    ),
    # SmolLM2-135M's shape (a Llama: hidden 576, 30 layers, 9 query and 3 key/value heads, MLP 1536, vocabulary
    # 49152, tied embeddings) with random weights; the tokenizer covers 8000 of the rows, the head all 49152
    "smol-dpo": dict(kind="dpo", **SMOL, batch=4, prompt=64, response=64, threads=2, steps=3, warmup=1),
    "smol-dpo-lora": dict(
        kind="dpo", same_as="smol-dpo", lora=16, **SMOL, batch=4, prompt=64, response=64, threads=2, steps=3, warmup=1
    ),
    "smol-grpo-64": dict(
        kind="grpo", **SMOL, prompts=2, group=8, prompt=32, new_tokens=64, threads=2, steps=2, warmup=1
    ),
}


# ---- shared setup: model folder and data ----------------------------------------------------------------


def build(name: str, root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    w = WORKLOADS[name]
    out = root / w.get("same_as", name)
    if (out / "data.json").exists():
        return out
    # byte-level BPE (what Qwen2's tokenizer class expects) trained so that each 3-letter word is one token
    import itertools
    import string

    from tokenizers import decoders, trainers

    letters = ["".join(t) for t in itertools.product(string.ascii_lowercase, repeat=3)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=w["vocab"], special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([" " + " ".join(letters[: w["vocab"]])] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config, causal_lm = (LlamaConfig, LlamaForCausalLM) if w.get("arch") == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config(
        vocab_size=w.get("model_vocab", len(tok)),
        hidden_size=w["hidden"],
        intermediate_size=w.get("mlp", 4 * w["hidden"]),
        num_hidden_layers=w["layers"],
        num_attention_heads=w["heads"],
        num_key_value_heads=w.get("kv_heads", w["heads"]),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    causal_lm(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(out)  # what both libraries will use
    single = [x for x in letters[: w["vocab"]] if len(loaded.encode(" " + x, add_special_tokens=False)) == 1]
    if len(single) < 100:
        raise RuntimeError(f"only {len(single)} words are single tokens; the benchmark tokenizer is broken")
    g = torch.Generator().manual_seed(1)

    def words(n):  # " w1 w2 ..." is n tokens; the EOS each library appends makes a response `response` long
        return "".join(" " + single[int(i)] for i in torch.randint(0, len(single), (n,), generator=g))

    if w["kind"] == "dpo":
        rows = [
            {"prompt": words(w["prompt"]), "chosen": words(w["response"] - 1), "rejected": words(w["response"] - 1)}
            for _ in range(w["batch"])
        ]
    else:
        rows = [{"prompt": words(w["prompt"])} for _ in range(w["prompts"])]
    (out / "data.json").write_text(json.dumps(rows))
    return out


# ---- workers: one measurement each, in their own process ------------------------------------------------


def worker(lib: str, name: str, folder: Path) -> dict:
    import torch

    w = WORKLOADS[name]
    torch.set_num_threads(w["threads"])
    rows = json.loads((folder / "data.json").read_text())
    steps = w["steps"] + w["warmup"]
    if lib == "limit":
        return {"lib": lib, "workload": name, **limit(folder, rows, w)}
    times = {
        ("mirl", "dpo"): mirl_dpo,
        ("mirl", "grpo"): mirl_grpo,
        ("trl", "dpo"): trl_dpo,
        ("trl", "grpo"): trl_grpo,
    }[lib, w["kind"]](folder, rows, w, steps)
    step_s = statistics.median(times[w["warmup"] :])
    return {
        "lib": lib,
        "workload": name,
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def mirl_dpo(folder, rows, w, steps):
    from mirl.models import load_policy
    from mirl.recipes import preference

    cfg = preference.Config(
        model=str(folder),
        task="",
        loss=w.get("loss", "dpo"),
        steps=steps,
        report=False,
        batch_size=w["batch"],
        lr=1e-4,
        warmup_steps=0,
        threads=w["threads"],
        eval_n=0,
        probe_every=0,
        max_len=w["prompt"] + w["response"] + 2,
        lora_r=w.get("lora", 0),
        lora_alpha=2 * w["lora"] if w.get("lora") else 16,
        out_dir=tempfile.mkdtemp(),
    )
    res = preference.train(cfg, model=load_policy(folder), data=rows)
    return [h["time/step_s"] for h in res.history]


def mirl_grpo(folder, rows, w, steps):
    from mirl.models import load_policy
    from mirl.recipes import grpo
    from mirl.rewards import register_reward

    if "bench_length" not in __import__("mirl.rewards", fromlist=["REWARDS"]).REWARDS:
        register_reward("bench_length")(lambda prompts, completions, **_: [len(c) % 7 / 7 for c in completions])
    cfg = grpo.Config(
        model=str(folder),
        task="",
        reward="bench_length",
        group_size=w["group"],
        prompts_per_step=w["prompts"],
        steps=steps,
        max_new_tokens=w["new_tokens"],
        ignore_eos=True,
        threads=w["threads"],
        eval_n=0,
        report=False,
        out_dir=tempfile.mkdtemp(),
    )
    res = grpo.train(cfg, model=load_policy(folder), data=rows)
    return [h["time/step_s"] for h in res.history]


# TRL's defaults on a CPU are bf16 autocast and activation checkpointing; mirl's are float32 without
# recomputation. The benchmark compares the same arithmetic: float32, no checkpointing, for both.
SAME_PRECISION = {"bf16": False, "gradient_checkpointing": False}


class _Timer:
    def __init__(self):
        self.times, self.t = [], None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.t)

        return CB()


def trl_dpo(folder, rows, w, steps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    timer = _Timer()
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=w["batch"],
        max_steps=steps,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        use_cpu=True,
        beta=0.1,
        learning_rate=1e-4,
        max_length=w["prompt"] + w["response"] + 2,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **SAME_PRECISION,
    )
    peft = None
    if w.get("lora"):
        from peft import LoraConfig

        peft = LoraConfig(r=w["lora"], lora_alpha=2 * w["lora"], target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(folder),
        callbacks=[timer.callback()],
        peft_config=peft,
    )
    trainer.train()
    return timer.times


def trl_grpo(folder, rows, w, steps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    timer = _Timer()
    n = w["prompts"] * w["group"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=n,
        num_generations=w["group"],
        max_steps=steps,
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-6,
        max_completion_length=w["new_tokens"],
        disable_tqdm=True,
        beta=0.0,
        dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": w["new_tokens"]},
        **SAME_PRECISION,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=args,
        reward_funcs=lambda prompts, completions, **_: [len(c) % 7 / 7 for c in completions],
        train_dataset=Dataset.from_list(rows * 4),
        processing_class=AutoTokenizer.from_pretrained(folder),
        callbacks=[timer.callback()],
    )
    trainer.train()
    return timer.times


def limit(folder, rows, w) -> dict:
    """The hardware's bound for the same work (module docstring): the plain forward + backward of the step's
    batch (median of 3 after one warm-up), plus for GRPO the roofline bound of decoding its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if w.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=w["lora"], lora_alpha=2 * w["lora"], target_modules="all-linear", task_type="CAUSAL_LM")
        )
    g = torch.Generator().manual_seed(0)
    if w["kind"] == "dpo":  # chosen and rejected of every pair: 2 x batch sequences
        n, length = 2 * w["batch"], w["prompt"] + w["response"]
    else:
        n, length = w["prompts"] * w["group"], w["prompt"] + w["new_tokens"]
    ids = torch.randint(2, min(len(tok), model.config.vocab_size), (n, length), generator=g)
    resp = w.get("response", w.get("new_tokens"))  # the positions whose tokens are scored
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    times = []
    for _ in range(4):  # the decoder over every position, the head and the loss on the response positions only
        t = time.perf_counter()
        hidden = base.model(input_ids=ids).last_hidden_state[:, -resp - 1 : -1]
        torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), ids[:, -resp:].flatten()).backward()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    out = {"train_s": statistics.median(times[1:])}
    if w["kind"] == "grpo":
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())  # tied head: the embedding matrix is the head
        peak = matmul_peak(w["threads"], "float32")
        bw = copy_bandwidth(w["threads"])
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        decode = 0.0
        for t in range(w["new_tokens"]):
            ctx = w["prompt"] + t + 1
            flops = 2 * params * n + 4 * n * cfg.num_hidden_layers * ctx * cfg.hidden_size  # matmuls + attention
            nbytes = 4 * (params + n * ctx * kv)  # float32 weights once, every row's keys and values
            decode += max(flops / peak, nbytes / bw)
        out.update(decode_s=decode, copy_gbps=bw / 1e9)
    out["limit_s"] = out["train_s"] + out.get("decode_s", 0.0)
    return out


def copy_bandwidth(threads: int, mb: int = 256) -> float:
    """Bytes per second read + written by a large float32 copy (the bound on streaming weights and cache)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.empty(mb * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def matmul_peak(threads: int, dtype_name: str, n: int = 1024) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def n_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if "embed" not in k:  # the FLOP count of a token's pass: matrices it multiplies, not lookups
                total += (
                    f.get_slice(k).get_shape().numel()
                    if hasattr(f.get_slice(k).get_shape(), "numel")
                    else __import__("math").prod(f.get_slice(k).get_shape())
                )
    return total


# ---- driver ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated workloads")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per library")
    ap.add_argument("--worker", nargs=3, metavar=("LIB", "WORKLOAD", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "mirl-bench"))
    args = ap.parse_args()
    if args.worker:
        lib, name, folder = args.worker
        with tempfile.TemporaryDirectory(prefix="mirl-bench-run-") as scratch:  # the runs' folders (GBs), removed
            tempfile.tempdir = scratch  # every mkdtemp of the run goes under it
            print("RESULT " + json.dumps(worker(lib, name, Path(folder))))
        return
    names = [n for n in WORKLOADS if not args.only or n in args.only.split(",")]
    root = Path(args.root)
    results = []
    for name in names:
        folder = build(name, root)
        w = WORKLOADS[name]
        runs = {"mirl": [], "trl": [], "limit": []}
        for _ in range(args.repeats):
            for lib in ("mirl", "trl", "limit"):
                env = {**os.environ, "OMP_NUM_THREADS": str(w["threads"]), "TOKENIZERS_PARALLELISM": "false"}
                r = subprocess.run(
                    [sys.executable, __file__, "--worker", lib, name, str(folder)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    print(f"{name} {lib} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs[lib].append(json.loads(line[0][7:]))
        row = {"workload": name, "threads": w["threads"]}
        for lib, rs in runs.items():
            if rs and lib != "limit":
                row[f"{lib}_steps_per_s"] = max(r["steps_per_s"] for r in rs)
                row[f"{lib}_rss_mb"] = min(r["peak_rss_mb"] for r in rs)
        if runs["limit"]:
            best = min(runs["limit"], key=lambda r: r["limit_s"])
            row.update({f"limit_{k}": v for k, v in best.items() if k.endswith(("_s", "_gbps"))})
        if w["kind"] == "dpo":
            tokens = 2 * w["batch"] * (w["prompt"] + w["response"])
            flops = 6 * n_params(folder) * tokens
            row["fp32_peak_gflops"] = matmul_peak(w["threads"], "float32") / 1e9
            row["bf16_peak_gflops"] = matmul_peak(w["threads"], "bfloat16") / 1e9
            for lib in ("mirl", "trl"):
                if f"{lib}_steps_per_s" in row:
                    row[f"{lib}_gflops"] = flops * row[f"{lib}_steps_per_s"] / 1e9
        results.append(row)
        print(json.dumps(row), flush=True)
    print_table(results)
    (root / "results.json").write_text(json.dumps(results, indent=1))


def print_cpu():
    """The CPU line: its name, native bf16, SIMD flags, the ATen kernels in use and the BLAS library."""
    import torch

    from mirl.cpu import NATIVE_BF16_FLAGS, cpu_info, cpu_vendor, native_bf16, this_cpu_decode_products

    name, flags = cpu_info()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    bf16 = f"{'yes' if native_bf16(flags) else 'no'} ({'/'.join(NATIVE_BF16_FLAGS)})"
    print(f"\nCPU: {name} ({cpu_vendor()}); native bf16 matmul: {bf16}")
    print(f"flags: {' '.join(simd) or 'unknown'}")
    blas = next(
        (w.split("=")[1] for w in torch.__config__.show().replace(",", " ").split() if w.startswith("BLAS_INFO=")), "?"
    )
    print(f"ATen CPU kernels: {torch.backends.cpu.get_cpu_capability()}; BLAS: {blas}; torch {torch.__version__}")
    print(this_cpu_decode_products().why)


def print_table(results):
    print_cpu()
    print(
        "\n| workload | threads | mirl steps/s | TRL steps/s | ratio | mirl peak RSS MB | TRL peak RSS MB "
        "| RSS ratio | limit steps/s | mirl % of limit | mirl GFLOP/s (% fp32 peak) | fp32 / bf16 matmul peak GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m, t = r.get("mirl_steps_per_s"), r.get("trl_steps_per_s")
        ratio = f"{m / t:.2f}x" if m and t else "-"
        rss = f"{r['mirl_rss_mb'] / r['trl_rss_mb']:.2f}" if "mirl_rss_mb" in r and "trl_rss_mb" in r else "-"
        gf = (
            f"{r['mirl_gflops']:.1f} ({100 * r['mirl_gflops'] / r['fp32_peak_gflops']:.0f}%)"
            if "mirl_gflops" in r
            else "-"
        )
        peak = f"{r['fp32_peak_gflops']:.0f} / {r['bf16_peak_gflops']:.0f}" if "fp32_peak_gflops" in r else "-"
        lim = r.get("limit_limit_s")
        share = f"{100 * lim * m:.0f}%" if lim and m else "-"
        lim_txt = f"{1 / lim:.2f}" if lim else "-"
        if "limit_decode_s" in r:  # GRPO: the forward + backward part and the decoding bound
            lim_txt += f" ({r['limit_train_s']:.2f} s train + {r['limit_decode_s']:.2f} s decode)"
        print(
            f"| {r['workload']} | {r['threads']} | {m or 0:.2f} | {t or 0:.2f} | {ratio} | "
            f"{r.get('mirl_rss_mb', 0):.0f} | {r.get('trl_rss_mb', 0):.0f} | {rss} | {lim_txt} | {share} | "
            f"{gf} | {peak} |"
        )


if __name__ == "__main__":
    main()
