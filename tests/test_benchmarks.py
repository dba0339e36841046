"""Standard benchmarks (data/benchmarks.py) through `mirl eval --benchmark` and --eval-benchmark, tested without a
network: local copies shaped like each hub dataset (its columns, answer format, splits and file kind), answer
extraction against hand-labelled completions, and mean@N, its standard error, pass@k and maj@k against a hand
computation from known completions. reasoning-gym's rg:gsm_symbolic is the stand-in that runs in full here."""

import json
import math
import os
import subprocess
import sys

import pytest

from mirl.cli import main
from mirl.data.benchmarks import (
    BENCHMARKS,
    BoxedQATask,
    benchmark_rows,
    benchmark_task,
    equivalent,
    extract_answer,
    gsm8k_reference,
)
from mirl.data.formats import DataError
from mirl.eval import evaluate, mean_and_se

# ---- answer extraction: (completion, the answer a reader takes from it) ---------------------------------------

EXTRACTION = [
    # boxed
    ("So the total is \\boxed{42}.", "42"),
    ("\\boxed{ 7 }", "7"),
    ("We get $x = \\boxed{\\frac{3}{4}}$", "\\frac{3}{4}"),
    ("The area is \\boxed{\\dfrac{\\sqrt{3}}{2}}.", "\\dfrac{\\sqrt{3}}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Final: \\boxed{x^2 + 1}", "x^2 + 1"),
    ("\\boxed{-5}", "-5"),
    ("\\boxed{1,000}", "1,000"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("\\boxed{[-2, 7]}", "[-2, 7]"),
    # several boxes: the last one
    ("First guess \\boxed{3}, but correcting: \\boxed{5}", "5"),
    ("\\boxed{1} \\boxed{2} \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Try \\boxed{10}. Hmm, 12 is wrong too, so \\boxed{11}", "11"),
    # boxed with trailing units
    ("\\boxed{18 \\text{ inches}}", "18 \\text{ inches}"),
    ("\\boxed{90^\\circ}", "90^\\circ"),
    ("\\boxed{50\\%}", "50\\%"),
    # "the answer is"
    ("Adding them up, the answer is 17.", "17"),
    ("The final answer is $\\frac{5}{8}$.", "\\frac{5}{8}"),
    ("Answer: 204", "204"),
    ("**Answer:** 9", "9"),
    ("The answer is: 3/4", "3/4"),
    ("I think the answer is 12.\nWait, let me recheck.\nThe answer is 13.", "13"),
    ("The answer is \\(2\\sqrt{2}\\).", "2\\sqrt{2}"),
    # "the answer is" with trailing units or currency
    ("The answer is 18 inches.", "18"),
    ("So the answer is $5.", "5"),
    ("The answer is 3 apples", "3"),
    # GSM8K style
    ("She has 3 + 4 = 7 left.\n#### 7", "7"),
    ("#### 1,234", "1,234"),
    # the last number
    ("She pays 4 * 3 = 12 dollars, then 12 + 6 = 18 dollars in total.", "18"),
    ("so it comes to 1,250 tickets", "1250"),
    ("The ratio is 3/4 of the whole", "3/4"),
    ("it drops to -7 degrees", "-7"),
    ("a total of 2.5 hours.", "2.5"),
    # no answer at all
    ("I am not sure how to solve this.", None),
    ("", None),
    ("\\boxed{", None),
]


@pytest.mark.parametrize("completion,expected", EXTRACTION)
def test_answer_extraction_matches_the_hand_labels(completion, expected):
    assert extract_answer(completion) == expected


def test_there_are_at_least_thirty_labelled_extraction_cases():
    assert len(EXTRACTION) >= 30


# (completion, reference as the preset reads it, scored correct?)
SCORING = [
    ("\\boxed{1234}", "1234", True),  # gsm8k
    ("It costs 1,234 dollars.\n#### 1,234", "1234", True),
    ("\\boxed{1233}", "1234", False),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # math500
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
    ("The answer is 14/3.", "\\frac{14}{3}", True),
    ("\\boxed{4.6667}", "\\frac{14}{3}", False),
    ("\\boxed{11\\sqrt{2}}", "11\\sqrt2", True),
    ("\\boxed{C}", "\\text{(C)}", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("The answer is 204.", "204", True),  # aime24 / aime25
    ("\\boxed{18 \\text{ inches}}", "18", True),  # units
    ("The answer is 18 inches.", "18", True),
    ("\\boxed{27}", "27", True),  # amc23's 27.0 read as 27
    ("I do not know.", "27", False),  # no answer
]


@pytest.mark.parametrize("completion,reference,right", SCORING)
def test_scoring_by_math_verify(completion, reference, right):
    assert equivalent(extract_answer(completion), reference) is right


def test_the_reference_answers_are_read_as_each_preset_says():
    assert gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert gsm8k_reference("...\n#### 1,200") == "1200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("72")
    assert BENCHMARKS["amc23"].reference(27.0) == "27"
    assert BENCHMARKS["amc23"].reference(0.5) == "0.5"
    assert BENCHMARKS["math500"].reference("\\frac{14}{3}") == "\\frac{14}{3}"


# ---- mean@N, its standard error, pass@k and maj@k against a hand computation ---------------------------------


def test_mean_at_n_its_standard_error_pass_and_maj_equal_a_hand_computation(monkeypatch):
    """Three questions (answers 1, 2, 3), four samples each, and one greedy completion each.

    Samples correct: 4 of 4, 2 of 4, 0 of 4 -> per-item means 1, 0.5, 0 -> mean@4 = 0.5;
    the standard error: sample variance ((0.5)^2 + 0 + (0.5)^2) / (3 - 1) = 0.25, se = sqrt(0.25 / 3) = 0.288675.
    pass@2 per item (1 - C(n - c, 2) / C(4, 2)): 1, 1 - 1/6 = 5/6, 0 -> mean 11/18.
    maj@2 over the first two samples: item 1 votes {1, 1} -> right; item 2 votes {2, 7}: a tie, the first (2) is
    right; item 3 votes {9, 9} -> wrong -> 2/3.
    Greedy: right, wrong, right -> accuracy 2/3, se = std(1, 0, 1) / sqrt(3) = sqrt(1/3) / sqrt(3) = 1/3."""
    task = BoxedQATask("hand", [{"question": f"q{i}", "answer": str(i), "where": f"row {i}"} for i in (1, 2, 3)])
    examples = task.examples("test", 0)
    greedy = [["\\boxed{1}"], ["\\boxed{5}"], ["\\boxed{3}"]]
    sampled = [
        ["\\boxed{1}", "The answer is 1.", "#### 1", "\\boxed{1.0}"],
        ["\\boxed{2}", "\\boxed{7}", "so 2", "\\boxed{8}"],
        ["\\boxed{9}", "\\boxed{9}", "\\boxed{4}", "nothing"],
    ]

    def fake_completions(policy, prompts, *, samples=1, **_):
        assert prompts == [e["prompt"] for e in examples]
        return sampled if samples == 4 else greedy

    monkeypatch.setattr("mirl.eval.completions", fake_completions)
    res = evaluate(None, task, examples, max_new_tokens=8, k=2, n_samples=4)
    assert res.mean_at_n == pytest.approx(0.5)
    assert res.mean_at_n_se == pytest.approx(math.sqrt(0.25 / 3))
    assert res.pass_at_k == pytest.approx(11 / 18)
    assert res.maj_at_k == pytest.approx(2 / 3)
    assert res.accuracy == pytest.approx(2 / 3)
    assert res.accuracy_se == pytest.approx(1 / 3)
    d = res.as_dict()
    assert d["mean@4"] == pytest.approx(0.5) and d["pass@2"] == pytest.approx(11 / 18) and "maj@2" in d
    p = res.predictions[1]
    assert p["completions"] == sampled[1] and p["extracted"] == ["2", "7", "2", "8"]
    assert p["scores"] == [1.0, 0.0, 1.0, 0.0] and p["greedy_score"] == 0.0 and p["reference"] == "2"


def test_the_standard_error_of_fewer_than_two_items_is_none():
    assert mean_and_se([]) == (0.0, None)
    assert mean_and_se([1.0]) == (1.0, None)
    assert mean_and_se([1.0, 0.0]) == (0.5, pytest.approx(0.5))  # var (0.25 + 0.25) / 1, se sqrt(0.5 / 2)


# ---- local copies shaped like the hub datasets -----------------------------------------------------------------

# (preset, file kind of the hub copy, {split: rows}, the references the preset reads)
COPIES = {
    "gsm8k": (
        "folder",  # openai/gsm8k (main): parquet train and test; columns question, answer ('... #### N')
        {
            "train": [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}],
            "test": [
                {"question": "Ann has 4 pens and loses 1. How many?", "answer": "4 - 1 = <<4-1=3>>3\n#### 3"},
                {
                    "question": "A box holds 1,000 nails; 2 boxes?",
                    "answer": "2 * 1000 = <<2*1000=2000>>2000\n#### 2,000",
                },
            ],
        },
        ["3", "2000"],
    ),
    "math500": (
        "jsonl",  # HuggingFaceH4/MATH-500: test.jsonl; problem, solution, answer (LaTeX), subject, level, unique_id
        {
            "test": [
                {
                    "problem": "Convert $(0,3)$ to polar.",
                    "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$",
                    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                    "subject": "Precalculus",
                    "level": 2,
                    "unique_id": "test/precalculus/807.json",
                },
                {
                    "problem": "What is $\\frac{28}{6}$?",
                    "solution": "... $\\boxed{\\frac{14}{3}}$",
                    "answer": "\\frac{14}{3}",
                    "subject": "Algebra",
                    "level": 1,
                    "unique_id": "test/algebra/1.json",
                },
            ]
        },
        ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}"],
    ),  # fmt: skip
    "aime24": (
        "folder",  # HuggingFaceH4/aime_2024: one train split; id, problem, solution, answer (a string), url, year
        {
            "train": [
                {
                    "id": 60,
                    "problem": "Find the sum 100 + 104.",
                    "solution": "It is 204.",
                    "answer": "204",
                    "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_1",
                    "year": "2024",
                },
                {
                    "id": 61,
                    "problem": "Find 5 * 5.",
                    "solution": "25",
                    "answer": "25",
                    "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_2",
                    "year": "2024",
                },
            ]
        },
        ["204", "25"],
    ),  # fmt: skip
    "aime25": (
        "jsonl",  # math-ai/aime25: test.jsonl; problem, answer, id
        {
            "test": [
                {"problem": "Find 7 * 10.", "answer": "70", "id": "0"},
                {"problem": "Find 8 + 9.", "answer": "17", "id": "1"},
            ]
        },
        ["70", "17"],
    ),  # fmt: skip
    "amc23": (
        "parquet",  # math-ai/amc23: test parquet; id, question, answer (float64), url
        {
            "test": [
                {"id": 0, "question": "Find 20 + 7.", "answer": 27.0, "url": "https://aops.com/2023_AMC_12A/1"},
                {"id": 1, "question": "Half of 1?", "answer": 0.5, "url": "https://aops.com/2023_AMC_12A/2"},
            ]
        },
        ["27", "0.5"],
    ),
}


def local_copy(tmp_path, name) -> str:
    """The preset's local copy in the hub dataset's shape: a datasets folder of its splits, or its one file."""
    import datasets

    kind, splits, _ = COPIES[name]
    if kind == "folder":
        path = tmp_path / name
        datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in splits.items()}).save_to_disk(path)
    elif kind == "parquet":
        path = tmp_path / f"{name}.parquet"
        datasets.Dataset.from_list(splits[BENCHMARKS[name].split]).to_parquet(path)
    else:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in splits[BENCHMARKS[name].split]))
    return str(path)


@pytest.mark.parametrize("name", sorted(COPIES))
def test_each_preset_reads_the_hub_id_config_and_split_it_names(monkeypatch, name):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, config=None, split=None, revision=None):
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list(COPIES[name][1][split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    b, rows = benchmark_rows(name)
    assert calls == [(b.hub_id, b.config or None, b.split)]
    task = benchmark_task(name)
    assert [e["answer"] for e in task.examples("test")] == COPIES[name][2]


@pytest.mark.parametrize("name", sorted(COPIES))
def test_each_preset_evaluates_a_local_copy_end_to_end(tmp_path, capsys, hf_tiny_dir, name):
    """`mirl eval --benchmark NAME:COPY` on a tiny chat model: every item asked through the chat template for a
    boxed answer, its reference read as the preset says, and one prediction line per item with every sample."""
    preds = tmp_path / "preds.jsonl"
    args = ["eval", "--model", str(hf_tiny_dir), "--benchmark", f"{name}:{local_copy(tmp_path, name)}"]
    args += ["--max-new-tokens", "6", "--n-samples", "2", "--k", "2", "--threads", "1", "--predictions", str(preds)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    refs = COPIES[name][2]
    assert out["task"] == name and out["n"] == len(refs)
    for key in ("accuracy", "accuracy_se", "mean@2", "mean@2_se", "pass@2", "maj@2"):
        assert key in out, key
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["reference"] for x in lines] == refs
    questions = COPIES[name][1][BENCHMARKS[name].split]
    column = BENCHMARKS[name].question
    for line, row in zip(lines, questions):
        assert line["prompt"].startswith(f"<|im_start|>user\n{row[column]}\nPlease reason step by step")
        assert len(line["completions"]) == len(line["extracted"]) == len(line["scores"]) == 2
    scores = [s for x in lines for s in x["scores"]]
    assert out["mean@2"] == pytest.approx(sum(scores) / len(scores))


def test_the_chat_prompt_asks_for_a_boxed_answer(hf_tiny_dir, tmp_path):
    from mirl.models import load_policy

    tok = load_policy(str(hf_tiny_dir)).tokenizer
    e = benchmark_task(f"aime25:{local_copy(tmp_path, 'aime25')}", tok).examples("test", 1)[0]
    assert e["prompt"] == (
        "<|im_start|>user\nFind 7 * 10.\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_any_dataset_by_data_and_its_columns(tmp_path, capsys):
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "Half of 1?", "a": "\\frac12"}, {"q": "3*3?", "a": "9"}]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "p.jsonl"
    args = ["eval", "--model", "gpt-nano", "--data", str(f), "--question-column", "q", "--answer-column", "a"]
    assert main(args + ["--max-new-tokens", "4", "--threads", "1", "--predictions", str(preds)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 3 and out["mean_score"] == out["accuracy"]
    assert [json.loads(x)["reference"] for x in preds.read_text().splitlines()] == ["4", "\\frac12", "9"]
    with pytest.raises(DataError, match="no column 'question'"):
        from mirl.data.benchmarks import dataset_task

        dataset_task(str(f))


def test_a_benchmark_not_in_the_cache_fails_in_one_line_with_the_command_that_fetches_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    proc = subprocess.run(
        [sys.executable, "-m", "mirl", "eval", "--model", "gpt-nano", "--benchmark", "gsm8k"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    assert "--benchmark gsm8k" in line and "openai/gsm8k" in line
    assert "datasets.load_dataset('openai/gsm8k', 'main', split='test')" in line and "gsm8k:PATH" in line


# ---- reasoning-gym: the stand-in that runs in full here ----------------------------------------------------


def test_rg_gsm_symbolic_runs_in_full_with_mean_pass_and_maj(tmp_path, capsys):
    from mirl.models import load_policy

    model = tmp_path / "nano"
    load_policy("gpt-nano", max_seq_len=1024, seed=0).save(model)
    preds = tmp_path / "p.jsonl"
    args = ["eval", "--model", str(model), "--task", "rg:gsm_symbolic", "--n", "3", "--max-new-tokens", "4"]
    assert main(args + ["--n-samples", "3", "--k", "2", "--threads", "1", "--predictions", str(preds)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] == "rg:gsm_symbolic" and out["n"] == 3
    for key in ("mean@3", "mean@3_se", "pass@2", "maj@2"):
        assert key in out, key
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 3 and all(len(x["completions"]) == 3 for x in lines)
    assert all(x["reference"] and x["reference"].lstrip("-").isdigit() for x in lines)


# ---- --eval-benchmark: the held-out set of a training run ---------------------------------------------------


def test_eval_benchmark_is_the_held_out_set_during_training_with_its_standard_error(tmp_path):
    from mirl.logging import read_metrics
    from mirl.recipes import sft

    copy = local_copy(tmp_path, "gsm8k")
    cfg = sft.Config(task="arith:1", n_train=64, steps=4, batch_size=8, eval_every=2, eval_benchmark=f"gsm8k:{copy}",
                     max_new_tokens=6, threads=1, report=False, out_dir=str(tmp_path / "run"))  # fmt: skip
    res = sft.train(cfg)
    evals = res.summary["evals"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:  # two items: accuracy 0, 0.5 or 1, and its standard error std / sqrt(2)
        expected = {0.0: 0.0, 0.5: 0.5, 1.0: 0.0}[e["accuracy"]]
        assert e["accuracy_se"] == pytest.approx(expected)
    logged = [m for m in read_metrics(tmp_path / "run") if "eval/accuracy" in m]
    assert [m["step"] for m in logged] == [2, 4] and all("eval/accuracy_se" in m for m in logged)
    assert res.summary["eval"]["n"] == 2 and "accuracy_se" in res.summary["eval"]


def test_eval_benchmark_in_grpo_online_and_dpo(tmp_path):
    """The RL loop (start_loop, finish_loop: grpo and online) and the preference recipe evaluate the benchmark
    before and after."""
    from mirl.recipes import grpo, online, preference

    copy = local_copy(tmp_path, "aime25")
    g = grpo.train(grpo.Config(task="arith:1", steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4,
                               eval_n=2, eval_benchmark=f"aime25:{copy}", threads=1, report=False,
                               out_dir=str(tmp_path / "g")))  # fmt: skip
    assert [e["step"] for e in g.summary["evals"]] == [0, 1]
    assert all("accuracy_se" in e for e in g.summary["evals"])
    o = online.train(online.Config(task="arith:1", steps=1, prompts_per_step=2, k=2, max_new_tokens=4, eval_n=2,
                                   eval_benchmark=f"aime25:{copy}", threads=1, report=False,
                                   out_dir=str(tmp_path / "o")))  # fmt: skip
    assert [e["step"] for e in o.summary["evals"]] == [0, 1] and all("accuracy_se" in e for e in o.summary["evals"])
    pairs = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a)} for a in range(8)]
    d = preference.train(preference.Config(task="", steps=1, batch_size=4, eval_n=1, eval_benchmark=f"aime25:{copy}",
                                           max_new_tokens=4, threads=1, report=False, out_dir=str(tmp_path / "d")),
                         data=pairs)  # fmt: skip
    assert d.summary["eval"]["n"] == 1 and d.summary["eval"]["accuracy_se"] is None  # one item: no error bar
