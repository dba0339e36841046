"""Experiment trackers as users know them, read back after a run: W&B in offline mode (its .wandb record file,
parsed with wandb's own protobuf), trackio's local store (its SQLite storage API), and --log-completions in
samples.jsonl and the report page."""

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")
pytest.importorskip("trackio")


def wandb_records(run_file: str) -> list:
    """The records of an offline W&B run file: a 7-byte header, then LevelDB-style log records in 32 KiB
    blocks (checksum 4 bytes, length 2, type 1: full / first / middle / last) holding Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    (run_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = []
    for rec in wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.fixture(scope="module")
def tracked_grpo(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tracked")
    out = tmp_path / "run"
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "TRACKIO_PROJECT": "mirl-test",
    }
    args = ["grpo", "--model", "gpt-nano", "--task", "arith:1", "--steps", "3", "--group-size", "4"]
    args += ["--prompts-per-step", "2", "--max-new-tokens", "8", "--eval-n", "4", "--threads", "1"]
    args += ["--report-to", "tensorboard,wandb,trackio", "--log-every", "2", "--log-completions", "3"]
    args += ["--reward", "task:1,short:0.1", "--out-dir", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mirl", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics, tmp_path


def test_wandb_offline_run_holds_the_metrics_and_the_completions_table(tracked_grpo):
    out, metrics, _ = tracked_grpo
    hist = wandb_history(out)
    logged = {h["_step"]: h for h in hist}
    assert sorted(logged) == [2, 3]  # --log-every 2, and the last step
    for m in metrics:
        if m["step"] in logged:
            assert logged[m["step"]]["reward/mean"] == pytest.approx(m["reward/mean"])
    table = logged[2]
    assert table["completions/_type"] == "table-file" and table["completions/nrows"] == 3
    (table_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / table["completions/path"]))
    content = json.loads(Path(table_file).read_text())
    assert content["columns"] == ["step", "prompt", "completion", "reward", "reward/short", "reward/task", "answer"]
    assert all(row[0] == 2 and row[1].endswith("=") for row in content["data"])


def test_trackio_store_holds_the_metrics_and_the_completions_table(tracked_grpo):
    out, metrics, tmp_path = tracked_grpo
    code = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S; "
        "runs = S.get_runs('mirl-test'); print(json.dumps([runs, S.get_logs('mirl-test', runs[0])]))"
    )
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs, logs = json.loads(proc.stdout.splitlines()[-1])
    assert len(runs) == 1 and runs[0].startswith("run-")
    scalars = {r["step"]: r for r in logs if "reward/mean" in r}
    assert sorted(scalars) == [2, 3]
    by_step = {m["step"]: m for m in metrics}
    for step, r in scalars.items():
        assert r["reward/mean"] == pytest.approx(by_step[step]["reward/mean"])
    tables = [r["completions"]["_value"] for r in logs if "completions" in r]
    assert len(tables) == 2 and all(len(t) == 3 for t in tables)
    assert set(tables[0][0]) >= {"prompt", "completion", "reward/task", "answer"}


def test_logged_completions_are_in_samples_jsonl_and_the_report(tracked_grpo):
    out, _, _ = tracked_grpo
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    rollouts = [r for r in rows if r["kind"] == "rollout"]
    assert [r["step"] for r in rollouts] == [2, 2, 2, 3, 3, 3]
    for r in rollouts:
        assert set(r["rewards"]) == {"task", "short"}
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert r["answer"] == str(a + b)
        # the total is the weighted sum of the functions' rewards
        assert r["reward"] == pytest.approx(r["rewards"]["task"] + 0.1 * r["rewards"]["short"])
    assert len({r["prompt"] for r in rollouts[:2]}) == 2  # one row per prompt first
    assert any(r["kind"] == "held-out" for r in rows)
    page = (out / "report" / "index.html").read_text()
    assert "completions sampled during training" in page and "reward/" not in page.split("<h2>")[0]


def test_an_unknown_tracker_is_refused_before_anything_loads(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mirl", "sft", "--report-to", "tensorboard,mlflow", "--out-dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--report-to" in proc.stderr and "mlflow" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_completion_tables_carry_the_prompt_images(tmp_path):
    """W&B keeps a table with images as an artifact: its table file and the PNGs are staged under
    WANDB_DATA_DIR (offline), the run's own table file names the image column."""
    out = tmp_path / "vlm"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(tmp_path / "wd")}
    args = ["grpo", "--model", "vlm-nano", "--task", "digits", "--steps", "1", "--group-size", "2"]
    args += ["--prompts-per-step", "2", "--max-new-tokens", "4", "--eval-n", "0", "--threads", "1", "--no-report"]
    args += ["--report-to", "wandb", "--log-completions", "2", "--out-dir", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "mirl", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (logged,) = [h for h in wandb_history(out) if "completions/path" in h]
    assert logged["completions/nrows"] == 2
    (table_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / logged["completions/path"]))
    assert json.loads(Path(table_file).read_text())["columns"][-1] == "image"
    from PIL import Image

    staged = [Path(f) for f in glob.glob(str(tmp_path / "wd" / "artifacts" / "staging" / "*"))]
    pngs = [f for f in staged if f.read_bytes()[:4] == b"\x89PNG"]
    assert pngs and all(Image.open(f).size == (32, 32) for f in pngs)  # the digits prompts' 32x32 images
    tables = [json.loads(f.read_text()) for f in staged if f.read_bytes()[:1] == b"{"]
    assert any("image" in t["column_types"]["params"]["type_map"] for t in tables)
    assert not (out / "tb").exists()  # --report-to wandb alone: no TensorBoard
