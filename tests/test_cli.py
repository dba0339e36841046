"""The CLI as a user runs it: flags from the dataclasses, YAML overrides, clear errors."""

import json
import subprocess
import sys

import pytest

from mirl.cli import main

PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a in range(6) for b in range(6)]


@pytest.fixture
def pairs_jsonl(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return p


def run_ok(argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dpo_mio_on_trl_jsonl_and_datasets_folder(tmp_path, pairs_jsonl, capsys):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(folder))
    for src in (pairs_jsonl, folder):
        out = run_ok(
            [
                "dpo",
                "--loss",
                "mio",
                "--data",
                str(src),
                "--task",
                "",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--out-dir",
                str(tmp_path / f"run_{src.name}"),
            ],
            capsys,
        )
        assert out["steps"] == 3 and out["pairs"] == len(PAIRS)
        assert (tmp_path / f"run_{src.name}" / "final" / "config.json").exists()


def test_yaml_overrides_and_flag_precedence(tmp_path, pairs_jsonl, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"loss: dpo\nsteps: 2\nbeta: 1\ndata: {pairs_jsonl}\ntask: ''\nbatch-size: 4\nthreads: 1\n"
        f"out_dir: {tmp_path / 'y'}\n"
    )
    out = run_ok(["dpo", "--config", str(cfg), "--steps", "3"], capsys)
    assert out["steps"] == 3  # the flag wins over the file
    saved = json.loads((tmp_path / "y" / "config.json").read_text())
    assert saved["beta"] == 1.0 and saved["loss"] == "dpo"


def test_unknown_yaml_key_lists_valid_ones(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: unknown key 'learning_rate'" in err and "valid keys: " in err and "batch_size" in err


def test_wrong_yaml_type(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("steps: many\n")
    assert main(["sft", "--config", str(cfg)]) == 2
    assert "key 'steps' must be an integer, got 'many'" in capsys.readouterr().err


def test_unknown_loss_lists_valid_ones(capsys):
    assert main(["dpo", "--loss", "dpoo"]) == 2
    err = capsys.readouterr().err
    assert "unknown loss 'dpoo'" in err and "mio" in err and "group_js" in err


def test_bad_data_row_reported_with_location(tmp_path, capsys):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    assert main(["dpo", "--data", str(p), "--task", "", "--out-dir", str(tmp_path / "o")]) == 2
    assert "broken.jsonl:2: missing field 'rejected'" in capsys.readouterr().err


def test_sft_then_eval_pass_at_k(tmp_path, capsys):
    run_ok(
        [
            "sft",
            "--task",
            "arith:1",
            "--steps",
            "5",
            "--n-train",
            "50",
            "--eval-n",
            "0",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "s" / "final"),
                "--task",
                "arith:1",
                "--n",
                "5",
                "--k",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the command's greedy accuracy is the library's evaluate() on the same held-out prompts
    from mirl.data.tasks import make_task
    from mirl.eval import evaluate
    from mirl.models import load_policy

    task = make_task("arith:1")
    want = evaluate(load_policy(tmp_path / "s" / "final"), task, task.examples("test", 5, 0), max_new_tokens=40)
    assert out["n"] == 5 and out["accuracy"] == want.accuracy and out["pass@2"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@pytest.mark.parametrize("cmd", sorted(__import__("mirl.cli").cli.COMMANDS))
def test_every_command_prints_its_help(cmd, capsys):
    """argparse formats help strings with %: a literal % in an option's doc crashed `mirl rm --help`."""
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"usage: mirl {cmd}" in out and "--config" in out


def test_help_lists_each_fields_choices_and_its_whole_doc(capsys):
    """The choices a field declares (options.choice, choice_list) follow its flag in --help, as argparse writes
    them, the policy terms and advantage estimators from their registries; a doc comment continued on the
    comment-only line below its field is joined, and a `# --` heading is not a continuation."""
    from mirl.advantages import ESTIMATORS
    from mirl.cli import _field_help
    from mirl.losses.policy import policy_terms
    from mirl.recipes import grpo

    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the usage and help lines
    assert "--loss-agg {grpo,bnpo,dapo,dr_grpo}" in out
    assert "--policy-loss {" + ",".join(policy_terms()) + "}" in out and "cispo" in policy_terms()
    assert "--advantage {" + ",".join(ESTIMATORS) + "}" in out
    assert "--report-to {tensorboard,wandb,trackio,none}[,...]" in out and "--noise-kinds {crop,noise}[,...]" in out
    helps = _field_help(grpo.Config)
    assert helps["row_seeded_sampling"].endswith("the same samples whatever the rank layout (always on under torchrun)")
    assert helps["eval_every_s"].endswith("(evaluations excluded; 0 = off)")  # the heading below it stays out
    assert helps["lora_r"] == "LoRA rank (0 = full fine-tuning)"


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "mirl", "dpo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--neg-mix" in r.stdout and "--ref-mode" in r.stdout


def test_demo_small(tmp_path, capsys):
    argv = ["demo", "--out-dir", str(tmp_path / "d"), "--task", "arith:1", "--sft-steps", "80", "--pref-steps", "2"]
    assert main(argv + ["--grpo-steps", "2", "--n-prompts", "32", "--k", "8", "--eval-n", "10", "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert set(summary) >= {"start_accuracy", "grpo", "dpo", "mio", "pairs"}
    assert (tmp_path / "d" / "demo.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "held-out accuracy" in err and "MIO" in err


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("examples/*/*.yaml")))
def test_example_configs_are_valid(path):
    """Every shipped YAML says which command reads it ('mirl X --config path') and names only its keys."""
    import importlib
    import re

    from mirl.cli import COMMANDS, load_yaml_overrides

    cmd = re.search(r"mirl (\w+) --config", open(path).read()).group(1)
    cls = importlib.import_module(COMMANDS[cmd][0]).Config
    assert load_yaml_overrides(path, cls)


def test_report_overlays_runs(tmp_path, pairs_jsonl, capsys):
    for name, loss in (("a", "dpo"), ("b", "mio")):
        run_ok(
            [
                "dpo",
                "--data",
                str(pairs_jsonl),
                "--task",
                "",
                "--loss",
                loss,
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--out-dir",
                str(tmp_path / name),
            ],
            capsys,
        )
    assert main(["report", "--runs", f"{tmp_path / 'a'},{tmp_path / 'b'}"]) == 0
    page = (tmp_path / "a" / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "&quot;loss&quot;: &quot;mio&quot;" in page
    assert (tmp_path / "a" / "report" / "loss.png").stat().st_size > 1000
    assert main(["report", "--runs", str(tmp_path / "nope")]) == 2
