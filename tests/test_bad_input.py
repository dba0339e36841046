"""Bad input through the CLI: every case gets a clear error (exit 2, or 1 for a stopped run) naming the
option, file, row or field, or a counted skip that the run reports; never a traceback, never silence.

Each case: the command line ({d} is a fresh folder holding the case's files), the files, the exit status
and the words the message must contain.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from mirl.cli import main

PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(4) for b in range(4)]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def sft_run(out_dir, steps, *extra) -> list[str]:
    """`mirl sft` on 1-digit addition for `steps` steps, a checkpoint every step, no evaluation or report."""
    return [
        "sft",
        "--task",
        "arith:1",
        "--steps",
        str(steps),
        "--save-every",
        "1",
        "--eval-n",
        "0",
        "--threads",
        "1",
        "--no-report",
        "--out-dir",
        str(out_dir),
        *extra,
    ]


FAST = ["--steps", "1", "--threads", "1", "--no-report", "--eval-n", "0"]
DPO = ["dpo", "--task", "", "--out-dir", "{d}/run", "--steps", "1", "--threads", "1", "--no-report"]
SFT = ["sft", "--task", "", "--out-dir", "{d}/run", *FAST]
GRPO = ["grpo", "--out-dir", "{d}/run", "--max-new-tokens", "4", "--group-size", "2", "--prompts-per-step", "2", *FAST]

CASES = [
    # ---- options: ranges and choices, before any model is loaded ----------------------------------------
    ("lr-negative", ["grpo", "--lr", "-1"], {}, 2, ["--lr -1.0", "finite number >= 0"]),
    ("lr-nan", ["grpo", "--lr", "nan"], {}, 2, ["--lr nan", "finite number"]),
    ("lr-inf", ["dpo", "--lr", "inf"], {}, 2, ["--lr inf"]),
    ("steps-zero", ["grpo", "--steps", "0"], {}, 2, ["--steps 0", "integer >= 1"]),
    ("group-size-zero", ["grpo", "--group-size", "0"], {}, 2, ["--group-size 0"]),
    (
        "group-size-one",
        ["grpo", "--group-size", "1", "--out-dir", "{d}/r"],
        {},
        2,
        ["--group-size 1: must be an integer >= 2"],
    ),
    ("top-p-zero", ["grpo", "--top-p", "0"], {}, 2, ["--top-p 0.0", "(0, 1]"]),
    ("top-p-above-one", ["online", "--top-p", "1.5"], {}, 2, ["--top-p 1.5"]),
    ("top-k-negative", ["grpo", "--top-k", "-1"], {}, 2, ["--top-k -1", "integer >= 0"]),
    ("temperature-zero", ["grpo", "--temperature", "0"], {}, 2, ["--temperature 0.0", "> 0"]),
    ("eval-temperature-negative", ["eval", "--temperature", "-1"], {}, 2, ["--temperature -1.0"]),
    ("advantage-unknown", ["grpo", "--advantage", "foo"], {}, 2, ["--advantage 'foo'", "group, rloo"]),
    ("scale-rewards-unknown", ["grpo", "--scale-rewards", "all"], {}, 2, ["--scale-rewards 'all'", "batch"]),
    ("loss-agg-unknown", ["grpo", "--loss-agg", "sum"], {}, 2, ["--loss-agg 'sum'", "dr_grpo"]),
    ("importance-unknown", ["grpo", "--importance", "seq"], {}, 2, ["--importance 'seq'", "sequence"]),
    ("kl-estimator-unknown", ["ppo", "--kl-estimator", "k9"], {}, 2, ["--kl-estimator 'k9'", "k1, k2, k3"]),
    ("kl-schedule-unknown", ["grpo", "--kl-schedule", "exp"], {}, 2, ["--kl-schedule 'exp'"]),
    ("dpo-beta-zero", ["dpo", "--beta", "0"], {}, 2, ["--beta 0.0", "> 0"]),
    ("dpo-beta-negative", ["dpo", "--beta", "-0.1"], {}, 2, ["--beta -0.1"]),
    ("grpo-beta-negative", ["grpo", "--beta", "-0.1"], {}, 2, ["--beta -0.1", ">= 0"]),
    ("ref-mode-unknown", ["dpo", "--ref-mode", "copy"], {}, 2, ["--ref-mode 'copy'", "precompute, model"]),
    ("logp-agg-unknown", ["dpo", "--logp-agg", "max"], {}, 2, ["--logp-agg 'max'", "sum, mean"]),
    ("critic-unknown", ["ppo", "--critic", "big"], {}, 2, ["--critic 'big'", "head, separate"]),
    ("clip-eps-zero", ["ppo", "--clip-eps", "0"], {}, 2, ["--clip-eps 0.0", "(0, 1)"]),
    ("batch-size-zero", ["sft", "--batch-size", "0"], {}, 2, ["--batch-size 0"]),
    ("max-len-zero", ["sft", "--max-len", "0"], {}, 2, ["--max-len 0"]),
    ("minibatches-zero", ["grpo", "--minibatches", "0"], {}, 2, ["--minibatches 0"]),
    ("threads-zero", ["sft", "--threads", "0"], {}, 2, ["--threads 0"]),
    ("time-budget-negative", ["grpo", "--time-budget-s", "-5"], {}, 2, ["--time-budget-s -5.0"]),
    ("min-lr-ratio-two", ["grpo", "--min-lr-ratio", "2"], {}, 2, ["--min-lr-ratio 2.0", "[0, 1]"]),
    ("label-smoothing-half", ["dpo", "--label-smoothing", "0.5"], {}, 2, ["--label-smoothing 0.5", "[0, 0.5)"]),
    ("max-new-tokens-zero", ["grpo", "--max-new-tokens", "0"], {}, 2, ["--max-new-tokens 0"]),
    ("rm-pairs-unknown", ["rm", "--pairs", "all"], {}, 2, ["--pairs 'all'", "synthetic, sampled, both"]),
    ("online-k-one", ["online", "--k", "1", "--out-dir", "{d}/r"], {}, 2, ["--k 1: must be an integer >= 2"]),
    ("loss-unknown", ["dpo", "--loss", "dpoo"], {}, 2, ["unknown loss 'dpoo'", "valid losses"]),
    ("loss-weight-text", ["dpo", "--loss", "dpo:abc"], {}, 2, ["loss weight for 'dpo' must be a number"]),
    ("loss-weight-nan", ["dpo", "--loss", "dpo:nan"], {}, 2, ["loss weight for 'dpo' must be finite"]),
    ("loss-mixed-kinds", ["dpo", "--loss", "dpo,group_js"], {}, 2, ["cannot combine pair and group losses"]),
    (
        "reward-weight-nan",
        [*GRPO, "--task", "arith:1", "--reward", "task:nan"],
        {},
        2,
        ["reward weight for 'task' must be finite"],
    ),
    ("reward-unknown", [*GRPO, "--task", "arith:1", "--reward", "correctness"], {}, 2, ["unknown reward"]),
    (
        "reward-task-without-task",
        [*GRPO, "--task", "", "--data", "{d}/p.jsonl", "--reward", "task"],
        {"p.jsonl": jsonl([{"prompt": "1+1="}])},
        2,
        ["reward 'task' needs a task"],
    ),
    ("task-unknown", ["grpo", "--task", "algebra", "--out-dir", "{d}/r"], {}, 2, ["algebra"]),
    ("noise-kinds-unknown", [*GRPO, "--task", "arith:1", "--noise-kinds", "blur"], {}, 2, ["--noise-kinds 'blur'"]),
    ("unknown-flag", ["grpo", "--learning-rate", "1e-4"], {}, 2, ["unrecognized arguments: --learning-rate"]),
    ("unknown-command", ["train"], {}, 2, ["unknown command 'train'"]),
    # ---- YAML config files -------------------------------------------------------------------------------
    (
        "yaml-bool-for-int",
        ["sft", "--config", "{d}/c.yaml"],
        {"c.yaml": "steps: true\n"},
        2,
        ["c.yaml: key 'steps' must be an integer, got True"],
    ),
    (
        "yaml-string-for-float",
        ["sft", "--config", "{d}/c.yaml"],
        {"c.yaml": "lr: fast\n"},
        2,
        ["key 'lr' must be a number, got 'fast'"],
    ),
    (
        "yaml-duplicate-key",
        ["sft", "--config", "{d}/c.yaml"],
        {"c.yaml": "steps: 3\nlr: 0.1\nsteps: 4\n"},
        2,
        ["c.yaml: line 3: key 'steps' is given twice"],
    ),
    ("yaml-folder", ["sft", "--config", "{d}"], {}, 2, ["is a folder; --config takes a YAML file"]),
    ("yaml-missing", ["sft", "--config", "{d}/none.yaml"], {}, 2, ["none.yaml: config file not found"]),
    (
        "yaml-unknown-key",
        ["sft", "--config", "{d}/c.yaml"],
        {"c.yaml": "learning_rate: 0.1\n"},
        2,
        ["unknown key 'learning_rate'", "valid keys"],
    ),
    ("yaml-invalid", ["sft", "--config", "{d}/c.yaml"], {"c.yaml": "steps: [1, 2\n"}, 2, ["c.yaml: invalid YAML"]),
    ("yaml-list", ["sft", "--config", "{d}/c.yaml"], {"c.yaml": "- steps\n"}, 2, ["expected a mapping"]),
    ("yaml-not-utf8", ["sft", "--config", "{d}/c.yaml"], {"c.yaml": b"steps: 3 \xff\n"}, 2, ["c.yaml: not UTF-8"]),
    (
        "yaml-tab",
        ["sft", "--config", "{d}/c.yaml"],
        {"c.yaml": "\tsteps: 5\n"},
        2,
        ["c.yaml: invalid YAML at line 1, column 1"],
    ),
    (
        "yaml-float-for-int",
        ["sft", "--config", "{d}/c.yaml"],
        {"c.yaml": "steps: 1.5\n"},
        2,
        ["key 'steps' must be an integer, got 1.5"],
    ),
    ("yaml-null", ["sft", "--config", "{d}/c.yaml"], {"c.yaml": "lr:\n"}, 2, ["key 'lr' must be a number, got None"]),
    ("yaml-inf", ["sft", "--config", "{d}/c.yaml"], {"c.yaml": "lr: .inf\n"}, 2, ["--lr inf: must be a finite"]),
    ("yaml-range", ["sft", "--config", "{d}/c.yaml"], {"c.yaml": "lr: -1e-4\n"}, 2, ["--lr -0.0001"]),
    # ---- data files --------------------------------------------------------------------------------------
    ("data-missing", [*DPO, "--data", "{d}/none.jsonl"], {}, 2, ["no such file or folder: {d}/none.jsonl"]),
    ("data-empty", [*DPO, "--data", "{d}/p.jsonl"], {"p.jsonl": ""}, 2, ["p.jsonl: the dataset is empty"]),
    ("data-blank", [*DPO, "--data", "{d}/p.jsonl"], {"p.jsonl": "\n  \n\n"}, 2, ["p.jsonl: the dataset is empty"]),
    (
        "data-not-utf8",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([PAIR]).encode() + b'{"prompt": "\xff"}\n'},
        2,
        ["p.jsonl:2: invalid UTF-8"],
    ),
    (
        "data-bad-json",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([PAIR]) + "{prompt: 1}\n"},
        2,
        ["p.jsonl:2: malformed JSON"],
    ),
    (
        "data-not-object",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": "[1, 2]\n"},
        2,
        ["p.jsonl:1: each line must be a JSON object, got list"],
    ),
    ("data-format", [*DPO, "--data", "{d}/p.csv"], {"p.csv": "a,b\n"}, 2, ["unsupported format '.csv'"]),
    (
        "data-corrupt-parquet",
        [*DPO, "--data", "{d}/p.parquet"],
        {"p.parquet": b"PAR1 not really"},
        2,
        ["p.parquet: not a readable parquet file"],
    ),
    (
        "data-null-field",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([PAIR, {**PAIR, "chosen": None}])},
        2,
        ["p.jsonl:2: field 'chosen' is null"],
    ),
    (
        "data-missing-field",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{"prompt": "a", "chosen": "b"}])},
        2,
        ["p.jsonl:1: missing field 'rejected'", "row has: chosen, prompt"],
    ),
    (
        "data-prompt-number",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{**PAIR, "prompt": 5}])},
        2,
        ["p.jsonl:1: field 'prompt' must be a string or a list of chat messages, got int"],
    ),
    (
        "data-content-number",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{"prompt": [{"role": "user", "content": 7}], "chosen": "2", "rejected": "3"}])},
        2,
        ["p.jsonl:1: field 'prompt' message 0: 'content' must be a string or a list of parts, got int"],
    ),
    (
        "data-content-part",
        [*DPO, "--data", "{d}/p.jsonl"],
        {
            "p.jsonl": jsonl(
                [{"prompt": [{"role": "user", "content": [{"type": "audio"}]}], "chosen": "2", "rejected": "3"}]
            )
        },
        2,
        ["message 0 part 0: a part must be"],
    ),
    (
        "data-unknown-role",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{"prompt": [{"role": "human", "content": "hi"}], "chosen": "2", "rejected": "3"}])},
        2,
        ["p.jsonl:1: field 'prompt' message 0: unknown role 'human'", "valid roles"],
    ),
    (
        "data-message-without-role",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{"prompt": [{"content": "hi"}], "chosen": "2", "rejected": "3"}])},
        2,
        ["message 0: a message must be a mapping with 'role' and 'content'"],
    ),
    (
        "data-chosen-equals-rejected-all",
        [*DPO, "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{**PAIR, "rejected": "2"}] * 3)},
        2,
        ["no usable preference pairs", "chosen equals rejected: 3 (first at", "p.jsonl:1"],
    ),
    (
        "data-sft-messages-no-assistant",
        [*SFT, "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"messages": [{"role": "user", "content": "hi"}]}])},
        2,
        ["s.jsonl:1: field 'messages' must be chat messages ending with an assistant turn"],
    ),
    (
        "data-sft-all-too-long",
        [*SFT, "--data", "{d}/s.jsonl", "--max-len", "4"],
        {"s.jsonl": jsonl([{"prompt": "a long prompt", "completion": "x"}] * 2)},
        2,
        ["every row was skipped", "prompt longer than max_len: 2 (first at", "s.jsonl:1"],
    ),
    (
        "data-rl-missing-answer",
        [*GRPO, "--task", "", "--data", "{d}/p.jsonl", "--reward", "accuracy"],
        {"p.jsonl": jsonl([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])},
        2,
        ["p.jsonl:2: reward 'accuracy' needs the field 'answer'"],
    ),
    (
        "data-rl-task-reward-missing-answer",
        [*GRPO, "--task", "arith:1", "--data", "{d}/p.jsonl"],
        {"p.jsonl": jsonl([{"prompt": "1+1="}])},
        2,
        ["p.jsonl:1: reward 'task' needs the field 'answer'"],
    ),
    (
        "data-image-missing",
        [*SFT, "--model", "vlm-nano", "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"prompt": "<image>count", "completion": "1", "images": ["none.png"]}])},
        2,
        ["s.jsonl:1 field 'images'[0]: image file", "does not exist"],
    ),
    (
        "data-image-unreadable",
        [*SFT, "--model", "vlm-nano", "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"prompt": "<image>count", "completion": "1", "images": ["x.png"]}]), "x.png": b"nope"},
        2,
        ["s.jsonl:1 field 'images'[0]: unreadable image"],
    ),
    (
        "data-images-on-text-model",
        [*SFT, "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"prompt": "count", "completion": "1", "images": ["x.png"]}]), "x.png": "PNG"},
        2,
        ["s.jsonl:1"],
    ),
    # ---- models and checkpoints --------------------------------------------------------------------------
    (
        "adapter-only-without-lora",
        [*SFT, "--task", "arith:1", "--save-adapter-only"],
        {},
        2,
        ["--save-adapter-only needs LoRA adapters"],
    ),
    (
        "adapter-only-on-a-preset",
        [*SFT, "--task", "arith:1", "--save-adapter-only", "--lora-r", "4"],
        {},
        2,
        ["--save-adapter-only needs a base model loaded from a folder"],
    ),
    (
        "reward-rm-without-folder",
        [*GRPO, "--task", "arith:1", "--reward", "rm:"],
        {},
        2,
        ["reward 'rm:<folder>' needs the reward model's folder"],
    ),
    (
        "model-unfinished-run",
        [*SFT, "--task", "arith:1", "--model", "{d}/run0"],
        {"run0/config.json": '{"recipe": "sft", "steps": 3}'},
        2,
        ["run0 is a run folder without a final model"],
    ),
    (
        "model-missing",
        [*SFT, "--task", "arith:1", "--model", "{d}/nomodel"],
        {},
        2,
        ["no such file or folder: {d}/nomodel"],
    ),
    ("model-no-config", [*SFT, "--task", "arith:1", "--model", "{d}/m"], {"m/x.txt": "x"}, 2, ["has no config.json"]),
    (
        "model-bad-config-json",
        [*SFT, "--task", "arith:1", "--model", "{d}/m"],
        {"m/config.json": "{not json"},
        2,
        ["m/config.json: invalid JSON in the model config"],
    ),
    ("resume-without-checkpoint", [*SFT, "--task", "arith:1", "--resume"], {}, 2, ["no checkpoint to resume from"]),
    (
        "out-dir-is-a-file",
        [*SFT, "--task", "arith:1", "--out-dir", "{d}/f"],
        {"f": "x"},
        2,
        ["--out-dir {d}/f: cannot write the run folder"],
    ),
    (
        "out-dir-under-a-file",
        [*SFT, "--task", "arith:1", "--out-dir", "{d}/f/run"],
        {"f": "x"},
        2,
        ["--out-dir {d}/f/run: cannot write the run folder"],
    ),
    ("fsdp-with-lora", [*SFT, "--task", "arith:1", "--fsdp", "--lora-r", "4"], {}, 2, ["--fsdp does not support"]),
    (
        "rm-model-not-rm",
        [*GRPO, "--task", "arith:1", "--reward", "rm:{d}/m"],
        {"m/config.json": "{}"},
        2,
        ["is not a reward model folder"],
    ),
]


BOX_PROMPTS = jsonl([{"prompt": "where?", "box": [0, 0, 1, 1]}])
NEW_CASES = [
    # ---- options that cannot act in the combination given: the option, its value and what it needs --------
    ("is-cap-without-correction", ["grpo", "--is-cap", "5"], {}, 2, ["--is-cap 5.0 has no effect", "--is-correction"]),
    ("is-mode-without-correction", ["ppo", "--is-mode", "truncate"], {}, 2, ["--is-mode 'truncate' has no effect"]),
    ("step-baseline-without-step-rewards", ["grpo", "--step-baseline", "group"], {}, 2, ["needs --step-rewards"]),
    (
        "model-revision-on-a-local-folder",
        [*SFT, "--task", "arith:1", "--model", "{d}/m", "--model-revision", "main"],
        {"m/config.json": "{}"},
        2,
        ["--model-revision 'main' has no effect", "hub model id"],
    ),
    (
        "split-on-a-jsonl-file",
        [*SFT, "--data", "{d}/s.jsonl", "--split", "test"],
        {"s.jsonl": jsonl([{"prompt": "1+1=", "completion": "2"}])},
        2,
        ["--split 'test'", "s.jsonl is one file, with no splits"],
    ),
    ("split-without-data", ["grpo", "--split", "test"], {}, 2, ["--split 'test' has no effect: it needs --data"]),
    (
        "data-config-on-a-local-file",
        [*SFT, "--data", "{d}/s.jsonl", "--data-config", "en"],
        {"s.jsonl": jsonl([{"prompt": "1+1=", "completion": "2"}])},
        2,
        ["--data-config and --revision are for hub datasets"],
    ),
    (
        "entropy-coef-above-its-max",
        ["grpo", "--entropy-coef", "0.1", "--entropy-target", "0.5"],
        {},
        2,
        ["--entropy-coef 0.1 is above --entropy-coef-max 0.05"],
    ),
    ("entropy-coef-max-without-target", ["grpo", "--entropy-coef-max", "0.2"], {}, 2, ["needs --entropy-target > 0"]),
    ("dual-clip-c-with-clip", ["grpo", "--dual-clip-c", "5"], {}, 2, ["--dual-clip-c 5.0", "--policy-loss dual_clip"]),
    (
        "sapo-tau-with-cispo",
        ["ppo", "--policy-loss", "cispo", "--sapo-tau-pos", "2"],
        {},
        2,
        ["--sapo-tau-pos 2.0 has no effect", "--policy-loss sapo"],
    ),
    ("policy-loss-unknown", ["grpo", "--policy-loss", "ppo"], {}, 2, ["--policy-loss 'ppo'", "cispo, sapo"]),
    (
        "curriculum-stages-with-uniform",
        ["grpo", "--curriculum-stages", "5"],
        {},
        2,
        ["--curriculum-stages 5", "--prompt-sampler curriculum"],
    ),
    ("oversample-with-uniform", ["grpo", "--pass-rate-oversample", "8"], {}, 2, ["--prompt-sampler pass-rate"]),
    ("prompt-sampler-unknown", ["grpo", "--prompt-sampler", "hard-first"], {}, 2, ["--prompt-sampler 'hard-first'"]),
    ("vllm-memory-with-local-engine", ["grpo", "--vllm-memory", "0.5"], {}, 2, ["--vllm-memory 0.5", "--engine vllm"]),
    ("engine-unknown", ["online", "--engine", "sglang"], {}, 2, ["--engine 'sglang'", "local, vllm"]),
    ("max-refills-without-dynamic", ["grpo", "--max-refills", "2"], {}, 2, ["--max-refills 2", "--dynamic-sampling"]),
    ("kl-horizon-without-target", ["ppo", "--kl-horizon", "100"], {}, 2, ["--kl-horizon 100.0", "--kl-target > 0"]),
    ("beta-final-constant-schedule", ["grpo", "--beta-final", "0.1"], {}, 2, ["--kl-schedule linear or cosine"]),
    ("noise-without-noisy-rollout", ["grpo", "--noise-strength", "0.3"], {}, 2, ["--noisy-rollout > 0"]),
    ("lora-alpha-without-lora", ["dpo", "--lora-alpha", "32"], {}, 2, ["--lora-alpha 32 has no effect", "--lora-r"]),
    ("mc-rollouts-with-verifier", ["prm", "--mc-rollouts", "8"], {}, 2, ["--mc-rollouts 8", "--labels mc"]),
    (
        "sft-task-with-data",
        [*SFT, "--task", "arith:2", "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"prompt": "1+1=", "completion": "2"}])},
        2,
        ["--task 'arith:2' has no effect with --data"],
    ),
    ("dpo-k-with-data", [*DPO, "--data", "{d}/p.jsonl", "--k", "4"], {"p.jsonl": jsonl(PAIRS)}, 2, ["--k 4 has no"]),
    ("eval-n-samples-below-k", ["eval", "--n-samples", "2", "--k", "4"], {}, 2, ["--n-samples 2", "at least --k"]),
    ("eval-every-without-eval-n", [*SFT, "--eval-every", "5"], {}, 2, ["--eval-every has no effect with --eval-n 0"]),
    ("iterate-grpo-lr", ["iterate", "--grpo-lr", "-1"], {}, 2, ["--grpo-lr -1.0", "(the grpo phase's --lr)"]),
    ("iterate-group-size-one", ["iterate", "--group-size", "1"], {}, 2, ["--group-size 1", "the grpo phase's"]),
    ("iterate-sft-lr", ["iterate", "--sft-lr", "nan"], {}, 2, ["--sft-lr nan", "(the sft phase's --lr)"]),
    ("iterate-resume-nothing", ["iterate", "--resume", "--out-dir", "{d}/it"], {}, 2, ["no iterate run to resume"]),
    (
        "prm-resume-nothing",
        [
            "prm",
            "--resume",
            "--out-dir",
            "{d}/p",
            "--n-prompts",
            "2",
            "--eval-n",
            "0",
            "--steps",
            "1",
            "--threads",
            "1",
        ],
        {},
        2,
        ["no checkpoint to resume from"],
    ),  # fmt: skip
    ("prm-separators-one-step", ["prm", "--separators", ";"], {}, 2, ["--separators ';'", "every solution would be"]),
    ("prm-separators-empty", ["prm", "--separators", ""], {}, 2, ["--separators ''", "one step"]),
    (
        "distill-teacher-is-student",
        ["distill", "--teacher", "gpt-nano"],
        {},
        2,
        ["--teacher 'gpt-nano' is the student"],
    ),
    (
        "distill-teacher-is-student-folder",
        ["distill", "--teacher", "{d}/run", "--model", "{d}/run/final"],
        {"run/config.json": "{}", "run/final/config.json": "{}"},
        2,
        ["is the student"],
    ),
    ("distill-teacher-missing", ["distill", "--teacher", "{d}/none"], {}, 2, ["no such file or folder: {d}/none"]),
    ("chat-yes-without-template", ["eval", "--model", "gpt-nano", "--chat", "yes"], {}, 2, ["has no chat template"]),
    ("report-to-unknown", ["grpo", "--report-to", "mlflow"], {}, 2, ["--report-to 'mlflow'"]),
    (
        "step-rewards-without-a-step-verifier",
        [*GRPO, "--task", "countdown:3", "--step-rewards"],
        {},
        2,
        ["--step-rewards needs a task with a step verifier"],
    ),
    (
        "step-rewards-with-rloo",
        [*GRPO, "--task", "arith:1", "--step-rewards", "--advantage", "rloo"],
        {},
        2,
        ["--step-rewards makes its own token advantages"],
    ),
    (
        "curriculum-without-difficulty",
        [*GRPO, "--task", "", "--data", "{d}/p.jsonl", "--reward", "exact", "--prompt-sampler", "curriculum"],
        {"p.jsonl": jsonl([{"prompt": "1+1=", "answer": "2"}])},
        2,
        ["--prompt-sampler curriculum needs a 'difficulty' per prompt", "p.jsonl:1"],
    ),
    ("distill-jsd-beta-above-one", ["distill", "--jsd-beta", "2"], {}, 2, ["--jsd-beta 2.0", "[0, 1]"]),
    # ---- paths that look local are never taken for hub ids ------------------------------------------------
    (
        "model-typo-run-folder",
        [*SFT, "--task", "arith:1", "--model", "sftrun/final"],
        {},
        2,
        ["no such file or folder: sftrun/final"],
    ),
    ("model-dot-slash", [*SFT, "--task", "arith:1", "--model", "./nope"], {}, 2, ["no such file or folder: ./nope"]),
    ("model-home", ["eval", "--model", "~/nope-model"], {}, 2, ["no such file or folder: ~/nope-model"]),
    ("data-typo-file", [*DPO, "--data", "data/x.jsonl"], {}, 2, ["no such file or folder: data/x.jsonl"]),
    # ---- reward files ---------------------------------------------------------------------------------------
    (
        "reward-file-missing",
        [*GRPO, "--task", "arith:1", "--reward", "{d}/none.py:f"],
        {},
        2,
        ["none.py: no such file"],
    ),
    (
        "reward-file-no-function",
        [*GRPO, "--task", "arith:1", "--reward", "{d}/r.py"],
        {"r.py": "def score(prompts, completions, **_):\n    return [1.0] * len(completions)\n"},
        2,
        ["name the function after a colon", "it defines: score"],
    ),
    (
        "reward-file-unknown-function",
        [*GRPO, "--task", "arith:1", "--reward", "{d}/r.py:scorer"],
        {"r.py": "def score(prompts, completions, **_):\n    return [1.0] * len(completions)\n"},
        2,
        ["has no function 'scorer'; it defines: score"],
    ),
    (
        "reward-file-syntax-error",
        [*GRPO, "--task", "arith:1", "--reward", "{d}/r.py:f"],
        {"r.py": "def f(prompts, completions, **_)\n    return []\n"},
        2,
        ["r.py:1: syntax error"],
    ),
    (
        "reward-file-import-fails",
        [*GRPO, "--task", "arith:1", "--reward", "{d}/r.py:f"],
        {"r.py": "import no_such_module_here\n"},
        2,
        ["importing it raised ModuleNotFoundError"],
    ),
    (
        "reward-file-wrong-signature",
        [*GRPO, "--task", "arith:1", "--reward", "{d}/r.py:f@0.5"],
        {"r.py": "def f(completions):\n    return []\n"},
        2,
        ["reward 'r.py:f' must have the signature"],
    ),
    (
        "reward-head-truncated",
        [*GRPO, "--task", "arith:1", "--reward", "rm:{d}/m"],
        {"m/config.json": "{}", "m/reward_head.safetensors": b'\x40\x00\x00\x00\x00\x00\x00\x00{"proj.w'},
        2,
        ["m/reward_head.safetensors: cannot read the reward head", "truncated"],
    ),
    # ---- data -----------------------------------------------------------------------------------------------
    (
        "data-chosen-user-only",
        [*DPO, "--data", "{d}/p.jsonl"],
        {
            "p.jsonl": jsonl(
                [
                    {
                        "prompt": "1+1=",
                        "chosen": [{"role": "user", "content": "a"}],
                        "rejected": [{"role": "user", "content": "b"}],
                    }
                ]
            )
        },  # fmt: skip
        2,
        ["p.jsonl:1: field 'chosen' has no assistant turn"],
    ),
    (
        "data-difficulty-not-a-number",
        [*GRPO, "--task", "", "--data", "{d}/p.jsonl", "--reward", "exact", "--prompt-sampler", "curriculum"],
        {"p.jsonl": jsonl([{"prompt": "1+1=", "answer": "2", "difficulty": "easy"}])},
        2,
        ["p.jsonl:1: field 'difficulty' must be a finite number, got 'easy'"],
    ),
    (
        "data-prompt-longer-than-context",
        [*GRPO, "--task", "", "--data", "{d}/p.jsonl", "--reward", "exact"],
        {"p.jsonl": jsonl([{"prompt": "1" * 300 + "+1=", "answer": "2"}])},
        2,
        ["1 of 1 prompts are too long", "p.jsonl:1 (", "--max-new-tokens 4", "--max-len"],
    ),
    (
        "data-image-bad-data-uri",
        [*SFT, "--model", "vlm-nano", "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"prompt": "<image>n", "completion": "1", "images": ["data:image/png;base64,@@"]}])},
        2,
        ["s.jsonl:1 field 'images'[0]: the data: URI's base64 does not decode"],
    ),
    (
        "data-image-base64-not-an-image",
        [*SFT, "--model", "vlm-nano", "--data", "{d}/s.jsonl"],
        {"s.jsonl": jsonl([{"prompt": "<image>n", "completion": "1", "image": "QUJD" * 20}])},
        2,
        ["s.jsonl:1 field 'images'[0]: neither an image file nor base64 of an image"],
    ),
    (
        "report-corrupt-metrics",
        ["report", "{d}/r"],
        {"r/metrics.jsonl": '{"step": 1, "loss": 1}\n\n{"step": 2, "loss":\n{"step": 3}\n'},
        2,
        ["{d}/r/metrics.jsonl:3: malformed JSON"],
    ),
]
CASES += NEW_CASES
ENV_NO_DOC = "def add(a: int, b: int) -> str:\n    return str(a + b)\n\n\nclass E:\n    tools = [add]\n\n" + (
    "    def reset(self, example):\n        return []\n\n    def step(self, message):\n        return None\n"
)
ENV_CASES = [  # --env (issue 27): the environment's file, class and tools
    ("env-missing-file", ["grpo", "--env", "{d}/nope.py:X"], {}, 2, ["--env {d}/nope.py:X: no such file"]),
    ("env-not-a-class", ["grpo", "--env", "{d}/e.py:X"], {"e.py": "X = 3\n"}, 2, ["X is a int, not a class"]),
    (
        "env-wrong-methods",
        ["ppo", "--env", "{d}/e.py:E"],
        {"e.py": "class E:\n    def hello(self):\n        return 1\n"},
        2,
        ["--env {d}/e.py:E: E has no reset()", "reset(example) and step(message)"],
    ),
    (
        "env-tool-without-docstring",
        ["online", "--env", "{d}/e.py:E"],
        {"e.py": ENV_NO_DOC},
        2,
        ["tool add has no docstring"],
    ),
    ("env-no-such-builtin", ["grpo", "--env", "chess"], {}, 2, ["--env 'chess': not a built-in"]),
    ("max-turns-without-env", ["grpo", "--max-turns", "2"], {}, 2, ["--max-turns 2 has no effect: it needs --env"]),
    ("sft-env-without-demonstrations", ["sft", "--env", "python"], {}, 2, ["--env python: it has no demonstrations"]),
    (
        "sft-env-and-data",
        ["sft", "--env", "calc", "--data", "{d}/s.jsonl"],
        {"s.jsonl": '{"prompt": "1+1=", "completion": "2"}\n'},
        2,
        ["--env and --data are two sources of SFT data"],
    ),
    (
        "task-with-env",
        ["grpo", "--env", "calc", "--task", "arith:2"],
        {},
        2,
        ["--task 'arith:2' has no effect with --env"],
    ),
]
CASES += ENV_CASES


BENCHMARK_CASES = [  # mirl eval --benchmark / --data and --eval-benchmark (issue 28)
    ("eval-benchmark-unknown", ["eval", "--benchmark", "gsm9k"], {}, 2, ["--benchmark 'gsm9k'", "gsm8k, math500"]),
    (
        "eval-benchmark-and-data",
        ["eval", "--benchmark", "gsm8k", "--data", "{d}/q.jsonl"],
        {},
        2,
        ["--benchmark and --data are two sources"],
    ),
    ("eval-benchmark-with-task", ["eval", "--benchmark", "gsm8k", "--task", "arith:2"], {}, 2, ["--task 'arith:2'"]),
    (
        "eval-benchmark-copy-missing",
        ["eval", "--model", "gpt-nano", "--benchmark", "gsm8k:{d}/nope"],
        {},
        2,
        ["--benchmark gsm8k: no such file or folder"],
    ),
    (
        "eval-benchmark-copy-wrong-column",
        ["eval", "--model", "gpt-nano", "--benchmark", "gsm8k:{d}/g.jsonl"],
        {"g.jsonl": jsonl([{"problem": "1+1?", "answer": "#### 2"}])},
        2,
        ["--benchmark gsm8k: ", "g.jsonl:1: no column 'question' (it has: answer, problem)"],
    ),
    (
        "eval-benchmark-gsm8k-answer-without-hashes",
        ["eval", "--model", "gpt-nano", "--benchmark", "gsm8k:{d}/g.jsonl"],
        {"g.jsonl": jsonl([{"question": "1+1?", "answer": "2"}])},
        2,
        ["g.jsonl:1: column 'answer': no '#### <answer>' line"],
    ),
    (
        "eval-data-missing-column",
        ["eval", "--model", "gpt-nano", "--data", "{d}/q.jsonl", "--answer-column", "a"],
        {"q.jsonl": jsonl([{"question": "1+1?", "answer": "2"}])},
        2,
        ["q.jsonl:1: no column 'a'"],
    ),
    (
        "eval-data-split-of-a-file",
        ["eval", "--model", "gpt-nano", "--data", "{d}/q.jsonl", "--split", "test"],
        {"q.jsonl": jsonl([{"question": "1+1?", "answer": "2"}])},
        2,
        ["--split 'test'", "one file"],
    ),
    ("eval-question-column-without-data", ["eval", "--question-column", "q"], {}, 2, ["--question-column 'q' has no"]),
    ("eval-temperature-without-sampling", ["eval", "--temperature", "0.5"], {}, 2, ["--n-samples or --k > 1"]),
    ("sft-eval-benchmark-unknown", [*SFT, "--eval-benchmark", "gsm9k"], {}, 2, ["--eval-benchmark 'gsm9k'"]),
    ("sft-eval-benchmark-eval-n-0", [*SFT, "--eval-benchmark", "gsm8k"], {}, 2, ["has no effect", "--eval-n > 0"]),
    (
        "grpo-eval-benchmark-copy-missing",
        [*GRPO, "--eval-n", "2", "--eval-benchmark", "aime24:{d}/nope"],
        {},
        2,
        ["--eval-benchmark aime24: no such file or folder"],
    ),
    (
        "grpo-eval-benchmark-too-long",
        [*GRPO, "--eval-n", "2", "--eval-benchmark", "aime25:{d}/a.jsonl"],
        {"a.jsonl": jsonl([{"problem": "x" * 400, "answer": "1", "id": "0"}])},
        2,
        ["--eval-benchmark aime25: 1 of 1 prompts are too long"],
    ),
]
CASES += BENCHMARK_CASES


def _write(d, files):
    for name, content in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)


@pytest.mark.parametrize("argv,files,rc,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(tmp_path, capsys, argv, files, rc, words):
    _write(tmp_path, files)
    d = str(tmp_path)
    try:
        got = main([a.replace("{d}", d) for a in argv])
    except SystemExit as e:  # argparse's own errors (unknown flags) exit 2 after printing usage
        got = e.code
    err = capsys.readouterr().err
    assert got == rc, err[-2000:]
    assert "Traceback" not in err
    for w in words:
        assert w.replace("{d}", d) in err, err[-2000:]


# ---- counted skips and reports ---------------------------------------------------------------------------
def test_chosen_equal_to_rejected_is_a_counted_skip(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(jsonl(PAIRS + [{**PAIR, "rejected": "2"}]))
    rc = main([*[a.replace("{d}", str(tmp_path)) for a in DPO], "--data", str(tmp_path / "p.jsonl")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "chosen equals rejected: 1 (first at" in err and "p.jsonl:17" in err
    assert json.loads((tmp_path / "run" / "skips.json").read_text()) == {"chosen equals rejected": 1}


def test_unencodable_characters_are_counted_and_alike_pairs_skipped(tmp_path, capsys):
    """The tiny GPT's character vocabulary has no 'é' or 'ü': both become its unknown token, so the row is kept
    and counted (per side: 4 here); a pair whose sides differ only in such characters encodes alike and is skipped."""
    rows = PAIRS + [{"prompt": "1+1=", "chosen": "2 é", "rejected": "2 ü"}, {**PAIR, "prompt": "é+1="}]
    (tmp_path / "p.jsonl").write_text(jsonl(rows))
    rc = main([*[a.replace("{d}", str(tmp_path)) for a in DPO], "--data", str(tmp_path / "p.jsonl")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "chosen and rejected encode to the same tokens: 1 (first at" in err
    assert "characters the tokenizer cannot encode (kept as its unknown token): 4" in err


def test_a_byte_order_mark_is_not_data(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(PAIRS).encode())
    assert main([*[a.replace("{d}", str(tmp_path)) for a in DPO], "--data", str(tmp_path / "p.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 16


def test_split_of_a_datasets_folder(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train_prefs": Dataset.from_list(PAIRS), "test_prefs": Dataset.from_list(PAIRS[:4])}).save_to_disk(
        str(tmp_path / "ds")
    )
    argv = [a.replace("{d}", str(tmp_path)) for a in DPO] + ["--data", str(tmp_path / "ds")]
    assert main(argv) == 2
    assert (
        "no split 'train'; its splits are train_prefs, test_prefs (choose one with --split)" in capsys.readouterr().err
    )
    assert main(argv + ["--split", "train_prefs"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 16


def test_yaml_numbers_as_a_user_means_them(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; a float option takes it as the number."""
    from mirl.cli import load_yaml_overrides
    from mirl.recipes import grpo

    (tmp_path / "c.yaml").write_text("lr: 1e-4\nbeta: 0\nsteps: 3\n")
    assert load_yaml_overrides(tmp_path / "c.yaml", grpo.Config) == {"lr": 1e-4, "beta": 0.0, "steps": 3}


# ---- models and checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-step SFT run with a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    assert main(sft_run(out, 2)) == 0
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage,words",
    [
        ("truncate_weights", ["model.safetensors: cannot load the weights"]),
        ("remove_weights", ["model.safetensors: missing (the model's weights)"]),
        ("bad_tokenizer", ["tokenizer.json: invalid JSON in the tokenizer"]),
    ],
    ids=["truncated-safetensors", "missing-safetensors", "corrupt-tokenizer"],
)
def test_damaged_model_folder_is_named(tmp_path, capsys, tiny_run, damage, words):
    m = _copy(tiny_run / "final", tmp_path / "m")
    if damage == "truncate_weights":
        data = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "remove_weights":
        (m / "model.safetensors").unlink()
    else:
        (m / "tokenizer.json").write_text("{")
    rc = main(["eval", "--model", str(m), "--task", "arith:1", "--n", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for w in words:
        assert w in err


def test_run_folder_as_model_uses_its_final(tmp_path, capsys, tiny_run):
    assert main(["eval", "--model", str(tiny_run), "--task", "arith:1", "--n", "2", "--threads", "1"]) == 0
    assert f"{tiny_run} is a run folder: loading its final model" in capsys.readouterr().err


def test_resume_refuses_another_recipes_run_and_changed_options(tmp_path, capsys, tiny_run):
    run = _copy(tiny_run, tmp_path / "run")
    rc = main(["grpo", "--task", "arith:1", "--resume", "--out-dir", str(run), "--threads", "1"])
    assert rc == 2 and "holds a run of 'mirl sft'; it cannot be resumed by 'mirl grpo'" in capsys.readouterr().err
    base = [
        "sft",
        "--task",
        "arith:1",
        "--save-every",
        "1",
        "--eval-n",
        "0",
        "--threads",
        "1",
        "--no-report",
        "--out-dir",
        str(run),
        "--resume",
    ]
    assert main(base + ["--steps", "3", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "the options differ from the run's" in err and "--lr 0.003 -> 0.001" in err and "--steps 2 -> 3" in err
    assert main(base + ["--steps", "3", "--allow-config-change"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path, tiny_run):
    """A run killed after logging step 3 but before its checkpoint: resuming from step 2 must not repeat 3."""
    run = _copy(tiny_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    assert main(sft_run(run, 3, "--resume", "--allow-config-change")) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] != 9.0


def test_crash_between_checkpoint_renames_recovers(tmp_path, capsys, tiny_run):
    """save_checkpoint renames checkpoint/ to checkpoint.old/, then checkpoint.tmp/ to checkpoint/. Killed
    between the two, only checkpoint.old/ is complete: resuming puts it back."""
    run = _copy(tiny_run, tmp_path / "run")
    (run / "checkpoint").rename(run / "checkpoint.old")
    assert main(sft_run(run, 3, "--resume", "--allow-config-change")) == 0
    assert "recovered it from checkpoint.old" in capsys.readouterr().err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 3


def test_corrupt_checkpoint_state_is_named(tmp_path, capsys, tiny_run):
    run = _copy(tiny_run, tmp_path / "run")
    (run / "checkpoint" / "state.json").write_text("{")
    rc = main(sft_run(run, 2, "--resume"))
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint/state.json: invalid JSON in the checkpoint state" in err


def test_dpo_resume_with_other_pairs_is_refused(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(jsonl(PAIRS))
    (tmp_path / "b.jsonl").write_text(jsonl(PAIRS[:8]))
    base = ["dpo", "--task", "", "--steps", "2", "--threads", "1", "--no-report", "--out-dir", str(tmp_path / "r")]
    assert main(base + ["--data", str(tmp_path / "a.jsonl"), "--save-every", "1", "--stop-at-step", "1"]) == 0
    (tmp_path / "a.jsonl").write_text(jsonl(PAIRS[8:]))  # the same file name, other pairs
    assert main(base + ["--data", str(tmp_path / "a.jsonl"), "--resume"]) == 2
    assert "the preference pairs differ from those the run started with" in capsys.readouterr().err


def test_full_disk_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The second checkpoint's optimizer file cannot be written (no space): the run stops, names the file and
    keeps the checkpoint of step 1."""
    import errno

    from mirl import checkpoint

    real, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    out = tmp_path / "r"
    rc = main(sft_run(out, 3))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "checkpoint.tmp/optimizer.pt failed (No space left on device)" in err
    assert "the last good checkpoint" in err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (out / "checkpoint.tmp").exists()


# ---- rewards ---------------------------------------------------------------------------------------------
def _reward_set(fn, name, timeout_s=10.0):
    from mirl.rewards import RewardSet, check_signature

    check_signature(name, fn)
    return RewardSet([(name, fn, 1.0)], timeout_s=timeout_s)


def _scalar(prompts, completions, **_):
    return 1.0


def _nested(prompts, completions, **_):
    return [[1.0]] * len(completions)


def _strings(prompts, completions, **_):
    return ["1"] * len(completions)


def _exits(prompts, completions, **_):
    sys.exit(3)


def _swallows_timeout(prompts, completions, **_):
    try:
        time.sleep(5)
    except Exception:  # noqa: BLE001 - the point: a reward that catches everything
        pass
    return [1.0] * len(completions)


def _sleeps_and_swallows_base(prompts, completions, **_):
    try:
        time.sleep(5)
    except BaseException:  # noqa: BLE001 - even this is counted as a timeout
        pass
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "fn,timeout,kind",
    [
        (_scalar, 10.0, "returned float, not a list of 2 scores"),
        (_nested, 10.0, "returned a list"),
        (_strings, 10.0, "returned a str"),
        (_exits, 10.0, "exit (SystemExit: 3)"),
        (_swallows_timeout, 0.2, "timeout"),
        (_sleeps_and_swallows_base, 0.2, "timeout"),
    ],
    ids=["scalar", "nested", "strings", "sys-exit", "swallowed-timeout", "swallowed-base-timeout"],
)
def test_bad_reward_values_are_counted_faults(fn, timeout, kind):
    rs = _reward_set(fn, "bad", timeout)
    total, _, _ = rs.score(["p", "q"], ["a", "b"])
    assert bool(torch.isnan(total).all())
    assert len(rs.faults) == 1 and next(iter(rs.faults)).startswith(f"bad/{kind}"), rs.faults


def test_reward_with_wrong_signature_is_refused_at_start(tmp_path, capsys):
    from mirl.rewards import register_reward

    @register_reward("test_bad_signature_cli")
    def bad(completions):
        return [1.0]

    rc = main(
        [*[a.replace("{d}", str(tmp_path)) for a in GRPO], "--task", "arith:1", "--reward", "test_bad_signature_cli"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "reward 'test_bad_signature_cli' must have the signature" in err


# ---- images ----------------------------------------------------------------------------------------------
def test_image_over_the_decompression_limit_names_the_row(tmp_path, capsys, monkeypatch):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: PIL's bomb error
    (tmp_path / "s.jsonl").write_text(jsonl([{"prompt": "<image>count", "completion": "1", "images": ["big.png"]}]))
    rc = main(
        [*[a.replace("{d}", str(tmp_path)) for a in SFT], "--model", "vlm-nano", "--data", str(tmp_path / "s.jsonl")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "s.jsonl:1 field 'images'[0]: image too large to open safely" in err


# ---- signals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_the_last_step_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "r"
    cmd = [
        sys.executable,
        "-m",
        "mirl",
        "sft",
        "--task",
        "arith:1",
        "--steps",
        "100000",
        "--eval-n",
        "0",
        "--threads",
        "1",
        "--no-report",
        "--out-dir",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"stopped by {sig.name} after step" in err and "resume with the same command and --resume" in err
    assert "Traceback" not in err
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert step >= 2 and logged[-1] == step
    assert not (out / "final").exists()


# ---- rewards that will not stop, and stop signals --------------------------------------------------------
STUBBORN = """import time


def stubborn(prompts, completions, **_):
    while True:
        try:
            time.sleep(0.1)
        except BaseException:
            pass
"""


def test_a_reward_that_swallows_its_timeout_is_cut_off_counted_and_reported(tmp_path, capsys):
    """The reward catches everything (its timeout too) and loops forever: it runs in the reward worker, which is
    killed after --reward-timeout-s 1; the fault is counted, reported, and the run ends."""
    (tmp_path / "hang.py").write_text(STUBBORN)
    argv = [a.replace("{d}", str(tmp_path)) for a in GRPO] + ["--task", "arith:1", "--steps", "2"]
    t0 = time.time()
    rc = main(argv + ["--reward", f"{tmp_path}/hang.py:stubborn", "--reward-timeout-s", "1"])
    captured = capsys.readouterr()
    assert rc == 0 and time.time() - t0 < 60, captured.err[-2000:]
    assert "reward 'hang.py:stubborn': timeout" in captured.err and "Traceback" not in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["reward_faults"] == {"hang.py:stubborn/timeout": 2}


def test_sigterm_while_a_stubborn_reward_runs_ends_the_run_within_seconds(tmp_path):
    (tmp_path / "hang.py").write_text(STUBBORN)
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "mirl", "grpo", "--task", "arith:1", "--steps", "100", "--max-new-tokens", "4"]
    cmd += ["--group-size", "2", "--prompts-per-step", "2", "--eval-n", "0", "--threads", "1", "--no-report"]
    cmd += ["--reward", f"{tmp_path}/hang.py:stubborn", "--reward-timeout-s", "300", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "config.json").exists():
        time.sleep(0.2)
    time.sleep(2)  # the model is built and the first rollout is being scored: the reward loops
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 10, err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGTERM while a reward function was running" in err and "Traceback" not in err
    assert "no checkpoint had been written yet" in err


def test_reward_faults_the_worker_counts(tmp_path):
    """An unparseable or two-number IoU reference box is a counted fault (not a silent 0.0); a reward that kills
    its own process (os._exit) is a fault too, and the next call gets a fresh worker."""
    import os

    from mirl.rewards import get_reward

    rs = _reward_set(get_reward("iou"), "iou")
    total, per_fn, _ = rs.score(["q"] * 4, ["[0,0,2,2]"] * 4, box=["[1, 2]", [1, 2], "nonsense", [0, 0, 2, 2]])
    assert torch.isnan(per_fn[:3, 0]).all() and per_fn[3, 0] == 1.0
    assert rs.faults == {
        "iou/reference box '[1, 2]' is not '[x1, y1, x2, y2]'": 1,
        "iou/reference box [1, 2] has 2 numbers, not 4 (x1, y1, x2, y2)": 1,
        "iou/reference box 'nonsense' is not '[x1, y1, x2, y2]'": 1,
    }

    def dies(prompts, completions, **_):
        os._exit(3)

    rs = _reward_set(dies, "dies")
    for _ in range(2):
        total, _, _ = rs.score(["p"], ["a"])
        assert torch.isnan(total).all()
    assert sum(rs.faults.values()) == 2 and all("died" in k for k in rs.faults), rs.faults
    assert rs.worker.starts == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_prm_saves_a_checkpoint_that_resumes(tmp_path, sig):
    """prm had no signal handling (SIGINT: a traceback; SIGTERM: no message, nothing saved) and no checkpoints."""
    out = tmp_path / "prm"
    base = [sys.executable, "-m", "mirl", "prm", "--task", "arith:1", "--n-prompts", "4", "--samples-per-prompt", "1"]
    base += ["--eval-n", "0", "--batch-size", "4", "--threads", "1", "--out-dir", str(out)]
    proc = subprocess.Popen(base + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2
    ):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"stopped by {sig.name} after step" in err and "resume with the same command and --resume" in err
    assert "Traceback" not in err
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert step >= 2 and (out / "checkpoint" / "reward_head.safetensors").exists() and not (out / "final").exists()
    if sig == signal.SIGINT:
        return  # resuming is the same after either signal
    done = subprocess.run(
        base + ["--steps", str(step + 1), "--resume", "--allow-config-change"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 2)) and (out / "final" / "reward_head.safetensors").exists()


# ---- trackers --------------------------------------------------------------------------------------------
def test_wandb_without_credentials_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # none: no `wandb login` either
    rc = main(["grpo", "--report-to", "tensorboard,wandb", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--report-to wandb: no W&B credentials" in err and "WANDB_MODE=offline" in err
    assert not (tmp_path / "r").exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    from mirl.logging import wandb_credentials

    assert wandb_credentials()


def test_a_tracker_that_is_not_installed_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    assert main(["sft", "--report-to", "trackio", "--out-dir", str(tmp_path / "r")]) == 2
    assert "--report-to trackio needs the trackio package: pip install 'mirl[trackio]'" in capsys.readouterr().err


# ---- model folders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["eval", "grpo", "sft"])
def test_transformers_folder_without_tokenizer_files_is_named(tmp_path, capsys, hf_tiny_dir, command):
    """Without them transformers makes an empty tokenizer: every text encodes to nothing and sft trained at loss
    0; grpo and eval failed deep in the model."""
    import shutil

    m = tmp_path / "m"
    shutil.copytree(hf_tiny_dir, m)
    for f in m.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    argv = {
        "eval": ["eval", "--task", "arith:1", "--n", "2", "--threads", "1"],
        "grpo": [a.replace("{d}", str(tmp_path)) for a in GRPO] + ["--task", "arith:1"],
        "sft": [a.replace("{d}", str(tmp_path)) for a in SFT] + ["--task", "arith:1"],
    }[command]
    rc = main(argv + ["--model", str(m)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{m}: no tokenizer files" in err and "Traceback" not in err, err[-2000:]


def test_weights_of_another_size_name_the_mismatch(tmp_path, capsys, tiny_run):
    m = _copy(tiny_run / "final", tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "n_embd": 2 * cfg["n_embd"]}))
    assert main(["eval", "--model", str(m), "--task", "arith:1", "--n", "2", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot load the weights (Error(s) in loading state_dict for TinyGPT: size mismatch for" in err
    assert "different model sizes" in err


def test_max_len_beyond_a_saved_models_context_is_refused(tmp_path, capsys, tiny_run):
    argv = [a.replace("{d}", str(tmp_path)) for a in SFT] + ["--task", "arith:1", "--model", str(tiny_run / "final")]
    assert main(argv + ["--max-len", "1000"]) == 2
    assert "--max-len 1000: the model's context is 256 tokens" in capsys.readouterr().err


def test_a_reward_model_folder_used_as_a_policy_is_warned_about(tmp_path, capsys, tiny_run):
    from safetensors.torch import save_file

    m = _copy(tiny_run / "final", tmp_path / "rm")
    save_file({"proj.weight": torch.zeros(1, 128), "proj.bias": torch.zeros(1)}, str(m / "reward_head.safetensors"))
    assert main(["eval", "--model", str(m), "--task", "arith:1", "--n", "2", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"--model {m} is a reward model folder" in err and "reward head" in err and "is dropped" in err


def test_a_text_only_reward_model_on_image_prompts_is_refused_at_start(tmp_path, capsys):
    from mirl.models.heads import RewardModel
    from mirl.models.policy import new_tiny_policy

    RewardModel(new_tiny_policy("gpt-nano", seed=0)).save(tmp_path / "rm")
    argv = [a.replace("{d}", str(tmp_path)) for a in GRPO] + ["--model", "vlm-nano", "--task", "shapes"]
    assert main(argv + ["--reward", f"rm:{tmp_path / 'rm'}"]) == 2
    err = capsys.readouterr().err
    assert f"the reward model rm:{tmp_path / 'rm'} is text-only" in err and "mirl rm --model vlm-nano" in err
    assert "use a VLM: --model" not in err  # the user passed one already


def test_truncated_reference_logps_cache_is_named_on_resume(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(jsonl(PAIRS))
    base = ["dpo", "--task", "", "--steps", "2", "--threads", "1", "--no-report", "--out-dir", str(tmp_path / "r")]
    base += ["--data", str(tmp_path / "p.jsonl")]
    assert main(base + ["--save-every", "1", "--stop-at-step", "1"]) == 0
    ref = tmp_path / "r" / "ref_logps.safetensors"
    ref.write_bytes(ref.read_bytes()[:40])
    assert main(base + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{ref}: cannot read the cached reference log-probs" in err and "Traceback" not in err


def test_base64_images_are_decoded_not_taken_for_paths(tmp_path, capsys):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    rows = [
        {"prompt": "<image>count", "completion": "1", "images": [f"data:image/png;base64,{b64}"]},
        {"prompt": "<image>count", "completion": "1", "image": b64},
    ]
    (tmp_path / "s.jsonl").write_text(jsonl(rows))
    argv = [a.replace("{d}", str(tmp_path)) for a in SFT] + ["--model", "vlm-nano", "--data", str(tmp_path / "s.jsonl")]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]


def test_prompts_too_long_for_the_context_are_skipped_and_counted(tmp_path, capsys):
    rows = [{"prompt": "1" * 300 + "+1=", "answer": "2"}] + [
        {"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(4)
    ]
    (tmp_path / "p.jsonl").write_text(jsonl(rows))
    argv = [a.replace("{d}", str(tmp_path)) for a in GRPO] + ["--task", "", "--reward", "exact"]
    assert main(argv + ["--data", str(tmp_path / "p.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "1 of 5 prompts are too long" in err and "p.jsonl:1 (" in err and "those prompts are skipped" in err


# ---- the reward-weighted group losses (nca, infonca) ---------------------------------------------------------
NCA_CASES = [
    ("alpha-negative", ["online", "--loss", "nca", "--alpha", "-1"], {}, 2, ["--alpha -1.0", "finite number >= 0"]),
    ("alpha-nan", ["online", "--loss", "infonca", "--alpha", "nan"], {}, 2, ["--alpha nan", "finite number >= 0"]),
    (
        "alpha-without-a-weighted-loss",
        ["online", "--loss", "group_js", "--alpha", "0.5", "--out-dir", "{d}/r"],
        {},
        2,
        ["--alpha 0.5 has no effect", "reward-weighted --loss (nca, infonca)"],
    ),
    (
        "nca-on-pairs-without-rewards",
        [*DPO, "--data", "{d}/p.jsonl", "--loss", "nca"],
        {"p.jsonl": jsonl(PAIRS)},
        2,
        ["loss 'nca' weighs each group by its responses' scalar rewards", "mio"],
    ),
]


@pytest.mark.parametrize("argv,files,rc,words", [c[1:] for c in NCA_CASES], ids=[c[0] for c in NCA_CASES])
def test_reward_weighted_loss_options_get_a_clear_error(tmp_path, capsys, argv, files, rc, words):
    test_bad_input_gets_a_clear_error(tmp_path, capsys, argv, files, rc, words)


# ---- video (data/video.py) ------------------------------------------------------------------------------------
VIDEO_ROW = {"prompt": "<video>which way:", "completion": "left"}
VIDEO_CASES = [
    (
        "video-file-missing",
        [*SFT, "--model", "vlm-nano", "--data", "{d}/v.jsonl"],
        {"v.jsonl": jsonl([{**VIDEO_ROW, "video": "gone.mp4"}])},
        2,
        ["v.jsonl:1 field 'video': video file {d}/gone.mp4 does not exist"],
    ),
    (
        "video-file-corrupt",
        [*GRPO, "--task", "", "--reward", "exact", "--model", "vlm-nano", "--data", "{d}/v.jsonl"],
        {"v.jsonl": jsonl([{**VIDEO_ROW, "answer": "left", "video": "bad.mp4"}]), "bad.mp4": b"\x00 not a video" * 9},
        2,
        ["v.jsonl:1 field 'video': unreadable video {d}/bad.mp4 (InvalidDataError"],
    ),
    (
        "video-no-frames",
        [*SFT, "--model", "vlm-nano", "--data", "{d}/v.jsonl"],
        {"v.jsonl": jsonl([{**VIDEO_ROW, "video": []}])},
        2,
        ["v.jsonl:1 field 'video': the video has no frames"],
    ),
    (
        "video-on-a-text-model",
        [*SFT, "--data", "{d}/v.jsonl"],
        {"v.jsonl": jsonl([{**VIDEO_ROW, "video": [[[[0, 0, 0]]]]}])},
        2,
        ["v.jsonl:1: the row has 1 video(s) and 0 image(s) but the model is text-only"],
    ),
    (
        "video-options-without-data",
        [*GRPO, "--task", "motion", "--video-max-pixels", "1024"],
        {},
        2,
        ["--video-max-pixels 1024 has no effect: it needs --data"],
    ),
    ("video-fps-zero", [*SFT, "--video-fps", "0"], {}, 2, ["--video-fps 0.0: must be a finite number > 0"]),
]


@pytest.mark.parametrize("argv,files,rc,words", [c[1:] for c in VIDEO_CASES], ids=[c[0] for c in VIDEO_CASES])
def test_bad_video_gets_a_clear_error(tmp_path, capsys, argv, files, rc, words):
    test_bad_input_gets_a_clear_error(tmp_path, capsys, argv, files, rc, words)


def test_a_video_too_long_for_a_transformers_vlms_context_names_the_row(tmp_path, capsys):
    """A tiny Qwen2-VL with a context of 24 tokens: 8 grey frames of 56x56 are 4 pairs of 2x2 merged patches, 16
    video tokens, which with the prompt's text and vision_start/end do not fit."""
    from conftest import build_hf_vlm

    build_hf_vlm(tmp_path / "m", max_position_embeddings=24)
    row = {**VIDEO_ROW, "video": [[[t * 30] * 56] * 56 for t in range(8)]}
    argv = [*SFT, "--model", "{d}/m", "--data", "{d}/v.jsonl", "--max-len", "24"]
    words = ["v.jsonl:1: the prompt with its video tokens is", "(8 frames at 56x56) but the model's context is 24"]
    test_bad_input_gets_a_clear_error(tmp_path, capsys, argv, {"v.jsonl": jsonl([row])}, 2, words)


# ---- grpo --temporal-contrast (rollout/temporal.py) ------------------------------------------------------------
FRAME = [[[0, 0, 0]] * 32] * 32  # one 32x32 black frame
TEMPORAL_DATA = [*GRPO, "--task", "", "--reward", "exact", "--model", "vlm-nano", "--temporal-contrast", "--data"]
TEMPORAL_CASES = [
    (
        "temporal-contrast-alpha-negative",
        ["grpo", "--temporal-contrast", "--temporal-contrast-alpha", "-1"],
        {},
        2,
        ["--temporal-contrast-alpha -1.0: must be a finite number > 0"],
    ),
    (
        "temporal-contrast-alpha-nan",
        ["grpo", "--temporal-contrast", "--temporal-contrast-alpha", "nan"],
        {},
        2,
        ["--temporal-contrast-alpha nan: must be a finite number > 0"],
    ),
    (
        "temporal-contrast-alpha-without-the-switch",
        ["grpo", "--temporal-contrast-alpha", "0.5"],
        {},
        2,
        ["--temporal-contrast-alpha 0.5 has no effect: it needs --temporal-contrast"],
    ),
    (
        "temporal-contrast-with-env",
        ["grpo", "--env", "calc", "--temporal-contrast"],
        {},
        2,
        ["--temporal-contrast shuffles a prompt's video frames: it does not take --env"],
    ),
    (
        "temporal-contrast-on-a-text-model",
        [*GRPO, "--task", "arith:1", "--temporal-contrast"],
        {},
        2,
        ["--temporal-contrast shuffles video frames: it needs an image+text model"],
    ),
    (
        "temporal-contrast-without-video-rows",
        [*TEMPORAL_DATA, "{d}/t.jsonl"],
        {"t.jsonl": jsonl([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])},
        2,
        ["--temporal-contrast needs prompts with a video of at least 2 frames: none of the 2 prompts has one"],
    ),
    (
        "temporal-contrast-one-frame-videos",
        [*TEMPORAL_DATA, "{d}/v.jsonl"],
        {"v.jsonl": jsonl([{"prompt": "<video>which way:", "answer": "up", "video": [FRAME]}])},
        2,
        ["none of the 1 prompts has one"],
    ),
]


@pytest.mark.parametrize("argv,files,rc,words", [c[1:] for c in TEMPORAL_CASES], ids=[c[0] for c in TEMPORAL_CASES])
def test_bad_temporal_contrast_gets_a_clear_error(tmp_path, capsys, argv, files, rc, words):
    test_bad_input_gets_a_clear_error(tmp_path, capsys, argv, files, rc, words)
