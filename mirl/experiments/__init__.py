"""The papers' claims as commands, each writing plots, a JSON of every number and a summary table.

    mirl experiment mio-vs-dpo  [--quick] [--seeds 0,1,2]   # does MIO stop the chosen likelihood's decline?
    mirl experiment starvation  [--quick]                   # can RL learn what the reference never samples?
    mirl experiment rft-compare [--quick]                   # SFT, GRPO and its variants, PPO, online DPO / MIO
    mirl experiment mio-vs-dpo-real [--quick]               # the MIO claim on SmolLM2: a rate search, 3 seeds

Output: <out_dir>/<name>/{results.json, summary.md, *.png}. --quick is the CI size (at most 3 minutes on
a 2-core CPU); the full sizes take 5-15 minutes, rft-compare's about 130 (docs/results.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..logging import console
from .common import parse_seeds

NAMES = ("mio-vs-dpo", "starvation", "rft-compare", "mio-vs-dpo-real")


@dataclass
class Config:
    """Options of `mirl experiment`."""

    name: str = ""  # mio-vs-dpo | starvation | rft-compare | mio-vs-dpo-real
    quick: bool = False  # the CI size: fewer seeds, steps and methods' budgets (<= 3 minutes)
    seeds: str = "0,1,2"  # comma-separated seeds (mean and std over them)
    out_dir: str = "runs/experiments"  # results go to <out_dir>/<name>/
    threads: int = 2  # torch CPU threads
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N
    # -- mio-vs-dpo
    betas: str = "0.1,0.5,1.0"  # toy: betas
    toy_lrs: str = "1,10"  # toy: gradient-descent learning rates (one plot each)
    toy_losses: str = "dpo,mio,ipo,group_infonce,group_js"  # toy: losses from the registry
    toy_steps: int = 300  # toy: full-batch steps
    gpt_losses: str = "dpo,mio,ipo,nwj"  # tiny GPT: pair losses (group losses on pairs equal DPO / MIO)
    quick_gpt_losses: str = "dpo,mio"  # tiny GPT losses in --quick
    gpt_seeds: int = 2  # tiny GPT: how many of --seeds to run (each seed samples its own pairs)
    gpt_beta: float = 0.1  # tiny GPT: beta
    gpt_lr: float = 1e-4  # tiny GPT: learning rate
    pref_steps: int = 60  # tiny GPT: preference steps per loss
    sft_steps: int = 400  # tiny GPT: SFT steps of the start model (cached in <out>/sft)
    n_prompts: int = 512  # tiny GPT: prompts to sample pairs from
    eval_n: int = 300  # held-out prompts
    # -- starvation
    starve_steps: int = 200  # steps per method
    # -- rft-compare
    budget_s: float = 240.0  # wall-clock training budget per method, task and seed (evaluations excluded)
    budget_samples: int = 0  # instead an equal-samples budget: each run stops after this many samples (0 = off)
    workers: int = 2  # rft-compare: runs at a time (separate processes, one thread each)
    rft_seeds: int = 3  # rft-compare: how many of --seeds to run (3 x 10 methods x 2 tasks: about 130 minutes)
    tasks: str = "arith,digits"  # tasks compared
    methods: str = "sft,grpo,ppo,online_dpo,online_mio,cispo,sapo,gdpo,reinforce_pp_baseline,pass_rate"  # also:
    # dr_grpo, dapo, grpo_2x2 (GRPO's clipped loss with the two passes x two minibatches that cispo and sapo use)
    # -- mio-vs-dpo-real (experiments/real_pref.py; also --seeds, --eval-n, --workers)
    real_model: str = "smollm2"  # the start model (LoRA on it); --quick: a tiny GPT after 200 SFT steps on arith
    real_task: str = "arith:2"  # the task whose verified samples make the pairs, asked through the chat template
    real_losses: str = "dpo,mio,ipo,simpo"  # pair losses compared (the first is the table's baseline); online-nca too
    real_lrs: str = "5e-5,1e-4,2e-4"  # the rates searched at the first seed, picked on the validation split
    real_n_prompts: int = 400  # training prompts sampled for pairs (k samples each)
    real_k: int = 6  # samples per prompt
    real_temperature: float = 0.7  # sampling temperature of the pairs
    real_val_n: int = 200  # validation prompts: the task's train split after the pair prompts
    real_steps: int = 40  # optimizer steps per run
    real_batch_size: int = 8  # pairs per step
    real_beta: float = 0.1  # the losses' beta
    real_max_len: int = 96  # prompt + response tokens
    real_max_new_tokens: int = 32  # sampling and evaluation length
    real_bf16: bool = False  # bf16 autocast in training on a CPU (2x with AMX, 100x slower on AVX2; a GPU: auto)
    real_online_steps: int = 20  # online-nca / online-infonca in --real-losses: steps of --real-batch-size prompts


def run(cfg: Config) -> dict:
    """`mirl experiment NAME`: run one of the papers' claims and write its results folder."""
    if cfg.name not in NAMES:
        raise ValueError(f"mirl experiment needs a name: {', '.join(NAMES)} (got {cfg.name!r})")
    import torch

    torch.set_num_threads(max(1, cfg.threads))
    seeds = parse_seeds(cfg.seeds)
    if cfg.quick:
        seeds = seeds[:2]
    t0 = time.time()
    if cfg.name == "mio-vs-dpo":
        from .mio_vs_dpo import run as go
    elif cfg.name == "starvation":
        from .starvation import run as go
    elif cfg.name == "mio-vs-dpo-real":
        from .real_pref import run as go
    else:
        from .rft_compare import run as go
    out = go(cfg, seeds)
    console.print(
        f"[bold]{cfg.name}[/] done in {time.time() - t0:.0f} s: {out['table']}, {out['json']}, "
        f"{len(out['plots'])} plots"
    )
    return out
