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
    """Write `text` to `path` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (no space, permissions): the message names the file; the last good
    checkpoint is left as it was."""


def recover(run_dir: str | Path) -> None:
    """A run killed between the renames of save_checkpoint leaves no checkpoint/ but a complete copy:
    checkpoint.tmp/ (fully written before any rename) or checkpoint.old/ (the previous one). Put it back."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / CKPT, run_dir / f"{CKPT}.tmp", run_dir / f"{CKPT}.old"
    if final.exists():
        return
    for src in (tmp, old):
        if (src / "state.json").exists() and (src / "COMPLETE").exists():
            os.replace(src, final)
            from .logging import warn

            warn(f"{final} was missing (a run stopped between renames): recovered it from {src.name}")
            return


def save_checkpoint(
    run_dir: str | Path, policy, optimizer, step: int, extra: dict | None = None, write_extra=None
) -> Path:
    """extra: JSON-able state; write_extra(folder): writes more files (e.g. a value head) before the rename.
    A write that fails (no space left, permissions) removes the partial copy and raises CheckpointError."""
    run_dir = Path(run_dir)
    final = run_dir / CKPT
    tmp = run_dir / f"{CKPT}.tmp"
    recover(run_dir)
    current = tmp
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        current = tmp / "model"
        policy.save(current)
        current = tmp / "optimizer.pt"
        torch.save(optimizer.state_dict(), current)
        state = {
            "step": step,
            "torch_rng": torch.get_rng_state().tolist(),
            "python_rng": _py_state_to_json(random.getstate()),
            **(extra or {}),
        }
        current = tmp / "state.json"
        current.write_text(json.dumps(state))
        if write_extra is not None:
            current = tmp
            write_extra(tmp)
        current = tmp / "COMPLETE"
        current.write_text("")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        kept = f"the last good checkpoint {final} is kept" if final.exists() else "no earlier checkpoint exists"
        raise CheckpointError(f"writing {current} failed ({why}); {kept}") from e
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
    """Restore weights, optimizer and RNG in place; returns state.json (with 'step'). A missing or damaged
    file is an error naming it."""
    from .models.policy import ModelFileError, read_json

    recover(run_dir)
    ckpt = Path(run_dir) / CKPT
    if not (ckpt / "state.json").exists():
        raise FileNotFoundError(f"no checkpoint to resume from in {run_dir} (expected {ckpt}/state.json)")
    state = read_json(ckpt / "state.json", "checkpoint state")
    if not isinstance(state.get("step"), int):
        raise ModelFileError(f"{ckpt / 'state.json'}: no integer 'step'")
    policy.load_weights(ckpt / "model")
    try:
        kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
        for g, k in zip(optimizer.param_groups, kernels):  # the saved groups name their kernel: keep this run's
            g.update(k)  # (a fused checkpoint resumed under FSDP2 takes foreach, as its DTensors need)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ModelFileError(
            f"{ckpt / 'optimizer.pt'}: cannot load the optimizer state ({str(e).splitlines()[0][:200]})"
        ) from e
    try:
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        random.setstate(_py_state_from_json(state["python_rng"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{ckpt / 'state.json'}: invalid random-number state ({e})") from e
    return state


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])
