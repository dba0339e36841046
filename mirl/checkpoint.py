"""Checkpoints: model (safetensors), optimizer state, RNG state and step; written atomically; exact resume.

Layout of run_dir/checkpoint/:
    model/            policy.save() (safetensors + config + tokenizer)
    optimizer.pt      optimizer.state_dict() (tensors and numbers only; read with weights_only=True)
    state.json        step, RNG states, anything the recipe adds (e.g. reference log-probs' location)
A new checkpoint is written into checkpoint.tmp/ and then renamed over the old one, so a run killed
mid-write leaves the previous checkpoint intact. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

CKPT = "checkpoint"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, policy, optimizer, step: int, extra: dict | None = None,
                    write_extra=None) -> Path:
    """extra: JSON-able state; write_extra(folder): writes more files (e.g. a value head) before the rename."""
    run_dir = Path(run_dir)
    final = run_dir / CKPT
    tmp = run_dir / f"{CKPT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    policy.save(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {
        "step": step,
        "torch_rng": torch.get_rng_state().tolist(),
        "python_rng": _py_state_to_json(random.getstate()),
        **(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state))
    if write_extra is not None:
        write_extra(tmp)
    old = run_dir / f"{CKPT}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint(run_dir: str | Path, policy, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; returns state.json (with 'step')."""
    from safetensors.torch import load_file

    ckpt = Path(run_dir) / CKPT
    if not (ckpt / "state.json").exists():
        raise FileNotFoundError(f"no checkpoint to resume from in {run_dir} (expected {ckpt}/state.json)")
    model_dir = ckpt / "model"
    if policy.kind == "tiny":
        from safetensors.torch import load_model

        load_model(policy.model, str(model_dir / "model.safetensors"))
    else:
        sd = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        missing, unexpected = policy.model.load_state_dict(sd, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint {model_dir} has unexpected weights: {unexpected[:5]}")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    random.setstate(_py_state_from_json(state["python_rng"]))
    return state


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])
