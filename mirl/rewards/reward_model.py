"""A learned reward model as a reward function: 'rm:<folder>' in a reward spec."""

from __future__ import annotations

import torch


class RewardModelReward:
    """f(prompts, completions, images=None, **_) -> scores of prompt (+ its images) + completion under a
    trained RewardModel."""

    in_process = True  # mirl's own code, and a model: it runs in the training process, not the reward worker

    def __init__(self, path: str, batch_size: int = 64, device="cpu", dtype: str = "float32"):
        from ..device import place_frozen
        from ..models.heads import RewardModel

        check_head_file(path)
        try:
            self.rm = RewardModel.load(path)
        except RuntimeError as e:  # a head of another backbone's width
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            why = "; ".join(lines)[:400]
            raise ValueError(f"reward rm:{path}: the reward head does not fit the backbone ({why})") from e
        self.rm = place_frozen(self.rm, device, dtype)
        self.batch_size = batch_size
        self.path = path
        self.__name__ = f"rm:{path}"

    def check_rows(self, rows: list[dict]) -> None:
        """A text-only reward model cannot score prompts with images: refused at start, naming the first row."""
        if self.rm.policy.is_vlm:
            return
        with_images = [r for r in rows if r.get("images")]
        if with_images:
            raise ValueError(
                f"{with_images[0].get('where', 'prompt 0')}: the prompts have images ({len(with_images)} of "
                f"{len(rows)} rows) but the reward model rm:{self.path} is text-only: it cannot see them. Train "
                "a reward model on an image+text backbone (mirl rm --model vlm-nano, or a transformers image-text "
                "model folder) and pass that one"
            )

    @torch.no_grad()
    def __call__(self, prompts, completions, images=None, **_):
        from ..data.collate import batch_images, pad_batch
        from ..models.heads import step_token_mask

        tok = self.rm.tokenizer
        images = images or [None] * len(prompts)
        out = []
        for s in range(0, len(prompts), self.batch_size):
            seqs = []
            for i in range(s, min(len(prompts), s + self.batch_size)):
                pi, img = self.rm.policy.encode_prompt(prompts[i], images[i], f"prompt {i}")
                # as training encoded responses (data/collate.py encode_example): no special tokens (a
                # Llama-style tokenizer would add BOS in front of the completion by default)
                ids = pi + tok.encode(completions[i], add_special_tokens=False) + [tok.eos_token_id]
                seqs.append((ids, len(pi)) if img is None else (ids, len(pi), img))
            device = self.rm.policy.device
            ids, attn, resp = pad_batch(seqs, tok.pad_token_id, device=device)
            steps = None
            if self.rm.aggregate == "step":  # a process reward model: the step ends of each response
                marks = [[0] * plen + step_token_mask(tok, seq[plen:], self.rm.separators) for seq, plen, *_ in seqs]
                steps, _, _ = pad_batch([(m, 0) for m in marks], 0, device=device)
            out += self.rm(ids, attn, resp, images=batch_images(seqs), step_mask=steps).tolist()
        return out


def check_head_file(path: str) -> None:
    """The reward head of a reward model folder must be a complete safetensors file: a missing, truncated or
    foreign one is an error naming it (RewardModel.load would fail deep inside safetensors)."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"reward rm:{path}: no such folder (a reward model folder saved by mirl rm or prm)")
    head = p / "reward_head.safetensors"
    if not head.exists():
        if (p / "final" / "reward_head.safetensors").exists():
            raise FileNotFoundError(f"{p} is a run folder: pass its reward model, rm:{p / 'final'}")
        raise FileNotFoundError(f"{path} is not a reward model folder (no reward_head.safetensors)")
    try:
        with safe_open(str(head), "pt") as f:
            names = set(f.keys())
            for k in names:
                f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(
            f"{head}: cannot read the reward head ({str(e).splitlines()[0][:200]}); the file is damaged or "
            "truncated: copy it again from the run that trained it"
        ) from e
    if names != {"proj.weight", "proj.bias"}:
        raise ValueError(f"{head}: not a mirl reward head (tensors {sorted(names)}; expected proj.weight, proj.bias)")
