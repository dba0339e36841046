"""`mirl iterate`: rejection-sampled SFT on verified samples, then GRPO, for N rounds in one run folder."""

import json

from mirl.cli import main
from mirl.experiments.iterate import accepted_samples


def test_verified_samples_keep_only_what_the_verifier_accepts():
    from mirl.data.tasks import make_task
    from mirl.models.policy import new_tiny_policy

    policy = new_tiny_policy("gpt-nano", seed=0)
    task = make_task("arith:1", policy.tokenizer)
    examples = task.examples("train", 16, 0)
    records, rate = accepted_samples(policy, task, examples, k=4, temperature=1.0, max_new_tokens=8, seed=0)
    assert all(task.score(r["completion"], e) >= 1.0 for r in records for e in examples if e["prompt"] == r["prompt"])
    assert 0.0 <= rate <= 1.0 and len(records) <= 16


def test_iterate_runs_rounds_in_one_folder(tmp_path):
    from mirl.recipes import sft

    start = tmp_path / "sft"
    sft.train(sft.Config(task="arith:1", steps=60, n_train=400, batch_size=32, eval_n=0, threads=2, report=False,
                         out_dir=str(start)))  # fmt: skip
    out = tmp_path / "it"
    args = ["iterate", "--model", str(start / "final"), "--task", "arith:1", "--rounds", "2", "--n-prompts", "32"]
    args += ["--samples-per-prompt", "4", "--sft-steps", "5", "--grpo-steps", "3", "--prompts-per-step", "4"]
    args += ["--group-size", "4", "--max-new-tokens", "16", "--eval-n", "50", "--threads", "2", "--out-dir", str(out)]
    assert main(args) == 0
    phases = json.loads((out / "iterate.json").read_text())["phases"]
    assert [(p["round"], p["phase"]) for p in phases] == [
        (0, "start"),
        (1, "sft"),
        (1, "grpo"),
        (2, "sft"),
        (2, "grpo"),
    ]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in phases)
    assert phases[1]["verified_prompts"] > 0  # the weak start gets some right: there is something to fine-tune on
    for r in (1, 2):
        assert (out / f"round{r}" / "sft" / "metrics.jsonl").exists() and (out / f"round{r}" / "grpo").is_dir()
    assert (out / "final").is_dir()
    assert main(["iterate", "--rounds", "0", "--out-dir", str(out)]) == 2  # bad input: one line, exit 2


def test_iterate_resumes_at_the_phase_it_reached(tmp_path):
    """A run stopped after round 1's SFT phase: --resume loads that phase's model (its run folder untouched) and
    runs round 1's GRPO phase only; a changed option is refused like every recipe's resume."""
    out = tmp_path / "it"
    args = ["iterate", "--model", "gpt-nano", "--task", "arith:1", "--rounds", "1", "--n-prompts", "8"]
    args += ["--samples-per-prompt", "2", "--sft-steps", "2", "--grpo-steps", "2", "--prompts-per-step", "2"]
    args += ["--group-size", "2", "--max-new-tokens", "8", "--eval-n", "4", "--threads", "1", "--out-dir", str(out)]
    assert main(args) == 0
    table = json.loads((out / "iterate.json").read_text())
    (out / "iterate.json").write_text(json.dumps({**table, "phases": table["phases"][:2]}))  # stopped after SFT
    verified_at = (out / "round1" / "verified.json").stat().st_mtime_ns
    grpo_metrics = out / "round1" / "grpo" / "metrics.jsonl"
    grpo_metrics.unlink()
    assert main(args + ["--resume"]) == 0
    phases = json.loads((out / "iterate.json").read_text())["phases"]
    assert [(p["round"], p["phase"]) for p in phases] == [(0, "start"), (1, "sft"), (1, "grpo")]
    assert (out / "round1" / "verified.json").stat().st_mtime_ns == verified_at and grpo_metrics.exists()
    assert main(args + ["--resume", "--grpo-lr", "1e-3"]) == 2


def test_a_stop_signal_during_rejection_sampling_is_not_lost(tmp_path, monkeypatch):
    """A SIGTERM that comes while round 1 samples used to be forgotten by the SFT phase's setup (it clears the
    stop request), so the phase trained anyway; now the run stops after the sampling, its samples kept (this
    failed on the old code)."""
    import mirl.experiments.iterate as it
    from mirl import stop

    def sampling_then_sigterm(policy, task, cfg, r, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "verified.json").write_text("{}")
        stop.request("SIGTERM")
        return [{"prompt": "1+2=", "completion": "1+2=3|3"}] * 4, 0.5  # something to fine-tune on

    monkeypatch.setattr(it, "round_samples", sampling_then_sigterm)
    out = tmp_path / "it"
    args = ["iterate", "--model", "gpt-nano", "--task", "arith:1", "--rounds", "1", "--n-prompts", "4"]
    args += ["--samples-per-prompt", "2", "--sft-steps", "2", "--grpo-steps", "1", "--prompts-per-step", "2"]
    args += ["--group-size", "2", "--max-new-tokens", "4", "--eval-n", "0", "--threads", "1", "--out-dir", str(out)]
    rc = main(args)
    stop.clear()
    assert rc != 0 and (out / "round1" / "verified.json").exists()
    assert not (out / "round1" / "sft" / "metrics.jsonl").exists()
