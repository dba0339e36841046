"""The prepared GPU check of the vLLM engine (docs/speed.md): run it on a machine with CUDA and vLLM installed
(`pip install 'mirl[vllm]'`), for at most a few minutes:

    python bench/gpu_vllm.py --out gpu_vllm.json

It builds a small Qwen2 from a config (nothing downloaded), then measures and checks on CUDA: the engine's
start-up, tokens/s of vLLM and of mirl's sampler on the same prompts, the in-place sync after a weight change
(the trainer's log-probs against vLLM's, before and after), and sleep/wake (device memory freed, the same
log-probs after waking and re-syncing). Prints one JSON object and writes it to --out."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_vllm.json")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    from conftest import build_hf_tiny

    from mirl.logps import response_logps
    from mirl.models.policy import load_policy
    from mirl.rollout.engine import LocalEngine, SamplingSettings, VLLMEngine
    from mirl.rollout.score import pack_rows

    tmp = Path(tempfile.mkdtemp())
    heads = args.hidden // 64
    build_hf_tiny(
        tmp / "model",
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
    )
    policy = load_policy(str(tmp / "model"))
    out: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}

    def gap(batch):
        ub = pack_rows([(batch, i) for i in range(len(batch.texts))], policy.tokenizer.pad_token_id)
        with torch.no_grad():
            lp, _ = response_logps(policy, ub.ids, ub.attn, ub.n_resp, 1.0)
        return float(((lp - ub.old_logps) * ub.resp_mask).abs().max())

    prompts = [policy.tokenizer.encode(f"{i}+{i + 3}=") for i in range(64)]
    settings = SamplingSettings(max_new_tokens=128, ignore_eos=True)
    t = time.perf_counter()
    engine = VLLMEngine(policy, tmp / "vllm-model", memory=0.3, seed=0)
    out["vllm_start_s"] = time.perf_counter() - t
    for name, eng in (("vllm", engine), ("local", LocalEngine(policy))):
        eng.generate(prompts[:4], 2, SamplingSettings(max_new_tokens=8))  # warm-up
        t = time.perf_counter()
        b = eng.generate(prompts, 4, settings, generator=torch.Generator().manual_seed(0))
        dt = time.perf_counter() - t
        out[f"{name}_tokens_per_s"] = float(b.response_mask.sum()) / dt
        out[f"{name}_logp_gap"] = gap(b)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    small = SamplingSettings(max_new_tokens=16)
    out["gap_before_sync"] = gap(engine.generate(prompts[:8], 2, small))
    t = time.perf_counter()
    engine.sync(policy)
    out["sync_s"] = time.perf_counter() - t
    out["gap_after_sync"] = gap(engine.generate(prompts[:8], 2, small))
    free0 = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    engine.sleep()
    free1 = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    engine.wake()
    engine.sync(policy)
    out["sleep_freed_gb"] = (free1 - free0) / 2**30
    out["gap_after_wake"] = gap(engine.generate(prompts[:8], 2, small))
    engine.close()
    print(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
