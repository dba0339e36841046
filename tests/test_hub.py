"""Models and datasets by hub id, the way transformers and datasets load them, tested without a network: a model
put into a Hugging Face cache made here, local copies shaped like trl-lib/ultrafeedback_binarized, trl-lib/tldr
and HuggingFaceH4/rlaif-v_formatted, and the one-line message when an id is neither cached nor reachable."""

import json
import os
import subprocess
import sys

import pytest

from mirl.data.formats import DataError, load_rows

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _mirl(args, env_extra, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "mirl", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _one_line_error(proc, name):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and name in lines[0], proc.stderr[-2000:]
    return lines[0]


def test_offline_hub_ids_fail_in_one_line_naming_the_id(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}  # an empty cache
    line = _one_line_error(
        _mirl(
            ["dpo", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--data", "trl-lib/ultrafeedback_binarized"],
            env,
            tmp_path,
        ),
        "Qwen/Qwen2.5-0.5B-Instruct",
    )
    assert "HF_HUB_OFFLINE" in line and "hf download" in line
    line = _one_line_error(
        _mirl(["dpo", "--model", "gpt-nano", "--data", "trl-lib/ultrafeedback_binarized"], env, tmp_path),
        "trl-lib/ultrafeedback_binarized",
    )
    assert "--repo-type dataset" in line


def test_a_hub_model_id_loads_from_the_hugging_face_cache(tmp_path, hf_tiny_dir):
    """The id goes to from_pretrained, which resolves it in the cache (the layout the hub's download writes)."""
    import shutil

    repo = tmp_path / "hf" / "hub" / "models--local-org--tiny-qwen"
    shutil.copytree(hf_tiny_dir, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    out = tmp_path / "run"
    proc = _mirl(
        ["sft", "--model", "local-org/tiny-qwen", "--task", "arith:1", "--steps", "2", "--eval-n", "0"]
        + ["--no-report", "--threads", "1", "--out-dir", str(out)],
        {"HF_HOME": str(tmp_path / "hf")},
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "model.safetensors").exists()
    # a revision the cache does not hold is the same one-line message
    proc = _mirl(
        ["eval", "--model", "local-org/tiny-qwen", "--model-revision", "v9", "--n", "2"],
        {"HF_HOME": str(tmp_path / "hf")},
        tmp_path,
    )
    _one_line_error(proc, "local-org/tiny-qwen")


def test_a_hub_dataset_id_goes_to_load_dataset_with_config_split_and_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_list([{"prompt": "1+2=", "completion": "3"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("trl-lib/tldr", "validation", "default", "refs/convert/parquet")
    assert calls == [("trl-lib/tldr", "default", "validation", "refs/convert/parquet")]
    assert rows[0].data == {"prompt": "1+2=", "completion": "3"}
    assert rows[0].where == "trl-lib/tldr/default (validation) row 0"


def test_a_split_the_hub_dataset_lacks_is_one_line(monkeypatch):
    import datasets

    def fake_load_dataset(name, config=None, split=None, revision=None):
        raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'test'].")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"dataset 'trl-lib/tldr': Unknown split \"dev\""):
        load_rows("trl-lib/tldr", "dev")


def test_config_and_revision_are_refused_for_a_local_path(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(DataError, match="for hub datasets"):
        load_rows(f, "train", "default")


# ---- local copies in the hub datasets' own shapes ----------------------------------------------------------


def _ultrafeedback_rows(n=12):
    rows = []
    for i in range(n):
        q = f"{i}+{i + 1}="
        rows.append(
            {
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": str(2 * i + 1)}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": str(2 * i + 2)}],
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
        )
    return rows


def _tldr_rows(n=12):
    return [{"prompt": f"SUBREDDIT: r/math POST: add {i} and {i}. TL;DR:", "completion": f" {2 * i}"} for i in range(n)]


def _rlaif_rows(n=6):
    from PIL import Image

    rows = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), (20 * i, 100, 200))  # the tiny VLM takes 32x32
        rows.append(
            {
                "images": [img],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            }
        )
    return rows


def _save(rows, tmp_path, name, kind):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if kind == "folder":
        path = tmp_path / name
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    else:
        path = tmp_path / f"{name}.parquet"
        ds.to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_ultrafeedback_shaped_data_trains_dpo_and_mio(tmp_path, kind):
    from mirl.recipes import preference

    path = _save(_ultrafeedback_rows(), tmp_path, "ultrafeedback", kind)
    for loss in ("dpo", "mio"):
        res = preference.train(
            preference.Config(
                model="gpt-nano",
                data=path,
                loss=loss,
                steps=3,
                batch_size=4,
                eval_n=0,
                threads=1,
                report=False,
                out_dir=str(tmp_path / f"{loss}-{kind}"),
            )
        )
        assert len(res.history) == 3 and all(h["loss"] > 0 for h in res.history)


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_tldr_shaped_data_trains_sft(tmp_path, kind):
    from mirl.recipes import sft

    path = _save(_tldr_rows(), tmp_path, "tldr", kind)
    res = sft.train(
        sft.Config(
            model="gpt-nano",
            data=path,
            steps=3,
            batch_size=4,
            eval_n=0,
            threads=1,
            report=False,
            out_dir=str(tmp_path / f"sft-{kind}"),
        )
    )
    assert len(res.history) == 3


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_rlaif_v_shaped_image_preferences_train_dpo(tmp_path, kind):
    from mirl.recipes import preference

    path = _save(_rlaif_rows(), tmp_path, "rlaif", kind)
    res = preference.train(
        preference.Config(
            model="vlm-nano",
            data=path,
            loss="dpo",
            steps=2,
            batch_size=3,
            eval_n=0,
            threads=1,
            report=False,
            out_dir=str(tmp_path / f"vdpo-{kind}"),
        )
    )
    assert len(res.history) == 2


def test_names_that_look_local_are_never_hub_ids(tmp_path, monkeypatch):
    """A mistyped local path must get 'no such file or folder', not the hint to download it from the hub."""
    from mirl.models.hf import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("trl-lib/ultrafeedback_binarized")
    for name in ("sftrun/final", "data/x.jsonl", "./nope", "../nope", "/abs/nope", "~/nope", "a/b/c", "runs/x"):
        assert not is_hub_id(name), name
