"""bench/gpu_check.py, the one-GPU check, in its dry form on this CPU (`--device cpu --quick`): every recipe
runs on the tiny model with a finite loss and moved weights, `mirl eval` and the injected out-of-memory error
are recorded, the JSON and the table are written; and one failing item is recorded while the rest still run,
with exit code 1."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("sft", "dpo", "rm", "prm", "grpo", "grpo --step-rewards", "online", "ppo", "distill")


def test_quick_check_on_cpu_runs_every_recipe(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--threads", "1"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] and report["steps"] == 2 and report["bf16"] is False
    rows = {(r["item"], r["model"]): r for r in report["items"]}
    for recipe in RECIPES:
        r = rows[recipe, "gpt-nano"]
        assert r["status"] == "ok" and r["loss_finite"] and r["weights_changed"], r
        assert r["steps"] == 2 and math.isfinite(r["loss_first"]) and r["steps_per_s"] > 0, r
    assert rows["mirl eval", "gpt-nano"]["status"] == "ok" and rows["mirl eval", "gpt-nano"]["n"] == 16
    oom = rows["injected OOM in update", "gpt-nano"]
    assert oom["status"] == "ok" and oom["rc"] != 0, oom
    assert "update" in oom["message"] and "step 2" in oom["message"] and "--prompts-per-step" in oom["message"]
    assert not any(model != "gpt-nano" for _, model in rows)  # --quick: no Qwen shape, TRL or vLLM
    table = out.with_suffix(".md").read_text()
    for recipe in RECIPES:
        assert f"| {recipe} | gpt-nano | ok |" in table


def test_a_failing_item_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    from mirl.rewards import REWARDS

    monkeypatch.setattr(gpu_check, "RECIPES", ("no-such-recipe", "sft"))
    threads = torch.get_num_threads()
    out = tmp_path / "check.json"
    try:
        rc = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        REWARDS.pop("gpu_check_length", None)
    assert rc == 1
    rows = {r["item"]: r for r in json.loads(out.read_text())["items"]}
    assert rows["no-such-recipe"]["status"] == "failed"
    assert rows["no-such-recipe"]["error"] == "ValueError: unknown recipe 'no-such-recipe'"
    assert rows["sft"]["status"] == "ok" and rows["sft"]["weights_changed"]
    assert "| no-such-recipe | gpt-nano | failed |" in out.with_suffix(".md").read_text()
