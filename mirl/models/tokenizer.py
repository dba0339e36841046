"""A character tokenizer for the built-in tasks: printable ASCII + newline, and four special tokens.

With image_token="<image>" (the tiny VLM) the placeholder string is one more special token, appended
after the characters, so a text model's vocabulary is unchanged.

It follows the part of the transformers tokenizer interface the library uses (encode, decode,
pad/eos/bos ids, apply_chat_template), so recipes treat it and an HF tokenizer alike.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def tokens_at_chars(tokenizer, ids: list[int], offsets: list[int]) -> list[int]:
    """For each character offset e of the decoded text, the first token whose text reaches e characters (the
    token holding character e - 1), clamped to the last token; each token's characters from decoding it alone
    (exact for character and byte-level vocabularies on ASCII text: the step verifiers' tasks)."""
    import torch

    if not ids:
        return [0 for _ in offsets]
    ends = torch.tensor([len(tokenizer.decode([t], skip_special_tokens=True)) for t in ids]).cumsum(0)
    at = torch.searchsorted(ends, torch.tensor(offsets, dtype=ends.dtype), right=False)
    return at.clamp(max=len(ids) - 1).tolist()


def eos_token_ids(*sources) -> tuple[int, ...]:
    """The end-of-sequence ids a sample ends on, sorted: the union of every source, each an id, a list of ids or
    None. Both engines stop on this one set (rollout/sample.py; rollout/engine.py gives it to vLLM).

    >>> eos_token_ids(2, [7, 2], None)
    (2, 7)
    """
    ids: set[int] = set()
    for s in sources:
        if isinstance(s, (list, tuple, set)):
            ids.update(int(i) for i in s)
        elif s is not None:
            ids.add(int(s))
    return tuple(sorted(ids))


class CharTokenizer:
    """A character-level tokenizer for the built-in tasks, with pad, BOS, EOS, unknown and image tokens."""

    type_name = "mirl-char"

    def __init__(self, chars: str = CHARS, image_token: str | None = None):
        self.chars = chars
        self.itos = SPECIALS + list(chars) + ([image_token] if image_token else [])
        self.stoi = {c: i + len(SPECIALS) for i, c in enumerate(chars)}
        self.image_token = image_token
        self.image_token_id = len(SPECIALS) + len(chars) if image_token else None
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2, 3
        self.pad_token, self.eos_token = "<pad>", "<eos>"
        self.padding_side = "left"
        self.chat_template = None

    @property
    def vocab_size(self) -> int:
        """The number of token ids."""
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (unknown characters become the unknown token); BOS first with add_special_tokens."""
        if self.image_token:
            ids = []
            for k, part in enumerate(text.split(self.image_token)):
                ids += ([self.image_token_id] if k else []) + [self.stoi.get(c, self.unk_token_id) for c in part]
        else:
            ids = [self.stoi.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of token ids; special tokens dropped unless asked for."""
        out = []
        for i in ids:
            i = int(i)
            if i < len(SPECIALS) or i == self.image_token_id:
                if not skip_special_tokens:
                    out.append(self.itos[i])
                continue
            out.append(self.itos[i] if i < len(self.itos) else "")
        return "".join(out)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **_):
        """A minimal template: 'role: content' lines, then 'assistant: ' when a reply is expected."""
        text = "".join(f"{m['role']}: {_content_text(m['content'])}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.encode(text) if tokenize else text

    def save_pretrained(self, path: str | Path) -> None:
        """tokenizer.json in `path`."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "tokenizer.json").write_text(
            json.dumps({"type": self.type_name, "chars": self.chars, "image_token": self.image_token})
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> CharTokenizer:
        """The tokenizer saved in `path`."""
        data = json.loads((Path(path) / "tokenizer.json").read_text())
        if data.get("type") != cls.type_name:
            raise ValueError(f"{path}/tokenizer.json is not a {cls.type_name} tokenizer")
        return cls(data["chars"], data.get("image_token"))


VIDEO_PLACEHOLDER = "<video>"  # where a video goes in a prompt (Qwen2-VL's and TRL's word)
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a prompt (TRL's convention); each model expands it


def _content_text(content) -> str:
    """A message's content as text; image parts become the image placeholder, video parts the video placeholder."""
    if isinstance(content, str):
        return content
    out = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "text":
            out.append(p.get("text", ""))
        elif isinstance(p, dict) and p.get("type") == "image":
            out.append(IMAGE_PLACEHOLDER)
        elif isinstance(p, dict) and p.get("type") == "video":
            out.append(VIDEO_PLACEHOLDER)
    return "".join(out)
