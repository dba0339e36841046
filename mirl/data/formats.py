"""Reading datasets in TRL's formats, unchanged, from JSONL, parquet or a `datasets` folder.

Every row carries its location ("file.jsonl:12", "data.parquet row 3") so that a bad row is reported
with file, line and field. Preference rows may be:
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt {"chosen": str | [messages], "rejected": ...}   (the shared prefix is the prompt)
Prompt-completion rows for SFT: {"prompt", "completion"} (strings or messages), or {"messages": [...]}.
Images (TRL's columns): "images" (a list) or "image" (one), each a path (relative to the data file's
folder), {"bytes", "path"} (datasets' Image feature) or a PIL image; chat messages may hold image parts
({"type": "image"}), which become the '<image>' placeholder. Every image is opened when the rows are read:
a missing or unreadable file is an error naming the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """Bad input, with where it is: file, line or row, and field."""


@dataclass
class Row:
    data: dict
    where: str  # "file.jsonl:12" or "folder row 3"
    base: str = ""  # folder that relative image paths start from


@dataclass
class SkipCounter:
    """Rows dropped for a reason are counted here and reported at the end of a run; none vanish silently."""
    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        if not self.counts:
            return "skipped rows: none"
        parts = [f"{k}: {v} (first at {self.examples[k]})" for k, v in sorted(self.counts.items())]
        return "skipped rows: " + "; ".join(parts)


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a .jsonl/.json-lines file, a .parquet file, or a folder saved with Dataset.save_to_disk."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise DataError(f"{p}: not a datasets folder saved with save_to_disk ({e})") from e
        if isinstance(ds, DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        return [Row(dict(r), f"{p} row {i}", str(p)) for i, r in enumerate(ds)]
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        return [Row(r, f"{p} row {i}", str(p.parent)) for i, r in enumerate(table.to_pylist())]
    if p.suffix in (".jsonl", ".json"):
        rows = []
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: malformed JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{p}:{n}: each line must be a JSON object, got {type(obj).__name__}")
                rows.append(Row(obj, f"{p}:{n}", str(p.parent)))
        return rows
    raise DataError(f"{p}: unsupported format {p.suffix!r}; use .jsonl, .parquet or a datasets folder")


def _require(row: Row, *fields: str) -> None:
    for f in fields:
        if f not in row.data or row.data[f] is None:
            have = ", ".join(sorted(row.data)) or "none"
            raise DataError(f"{row.where}: missing field {f!r} (row has: {have})")


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _message_text(messages) -> str:
    from ..models.tokenizer import _content_text

    return "".join(_content_text(m["content"]) for m in messages if m["role"] == "assistant")


def _prompt_text(prompt, tokenizer, where: str, field_name: str = "prompt") -> str:
    from ..models.tokenizer import _content_text

    if isinstance(prompt, str):
        return prompt
    if _is_messages(prompt):  # contents flattened to text, image parts as the '<image>' placeholder
        flat = [{"role": m["role"], "content": _content_text(m["content"])} for m in prompt]
        return tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    raise DataError(f"{where}: field {field_name!r} must be a string or a list of chat messages")


def _completion_text(x, where: str, field_name: str) -> str:
    if isinstance(x, str):
        return x
    if _is_messages(x):
        return _message_text(x)
    raise DataError(f"{where}: field {field_name!r} must be a string or a list of chat messages")


def _split_implicit(chosen, rejected, tokenizer, where):
    """Implicit prompt: the longest shared prefix (messages, or characters of strings) is the prompt."""
    if _is_messages(chosen) and _is_messages(rejected):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        if i == 0:
            raise DataError(f"{where}: implicit-prompt row: chosen and rejected share no leading message")
        return (_prompt_text(chosen[:i], tokenizer, where), _message_text(chosen[i:]),
                _message_text(rejected[i:]))
    if isinstance(chosen, str) and isinstance(rejected, str):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        return chosen[:i], chosen[i:], rejected[i:]
    raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both be message lists")


def row_images(row: Row) -> dict:
    """{'images': [PIL images], 'image_base'} of a row with an 'images' or 'image' column, else {}."""
    from ..models.vision import load_image

    d = row.data
    raw = d.get("images")
    if raw is None and d.get("image") is not None:
        raw = [d["image"]]
    if raw is None:
        return {}
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    return {"images": [load_image(x, f"{row.where} field 'images'[{i}]", row.base) for i, x in enumerate(raw)],
            "image_base": row.base}


def preference_records(rows: list[Row], tokenizer) -> list[dict]:
    """TRL preference rows -> [{'prompt', 'chosen', 'rejected', 'where'}] of strings."""
    out = []
    for row in rows:
        _require(row, "chosen", "rejected")
        d = row.data
        if "prompt" in d and d["prompt"] is not None:
            prompt = _prompt_text(d["prompt"], tokenizer, row.where)
            chosen = _completion_text(d["chosen"], row.where, "chosen")
            rejected = _completion_text(d["rejected"], row.where, "rejected")
        else:
            prompt, chosen, rejected = _split_implicit(d["chosen"], d["rejected"], tokenizer, row.where)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": row.where, **row_images(row)})
    return out


def completion_records(rows: list[Row], tokenizer) -> list[dict]:
    """SFT rows (prompt/completion, or messages ending in an assistant turn) -> [{'prompt', 'completion'}]."""
    out = []
    for row in rows:
        d = row.data
        if "messages" in d:
            msgs = d["messages"]
            if not _is_messages(msgs) or not msgs or msgs[-1]["role"] != "assistant":
                raise DataError(f"{row.where}: field 'messages' must be chat messages ending with an assistant turn")
            prompt = _prompt_text(msgs[:-1], tokenizer, row.where, "messages")
            completion = _message_text(msgs[-1:])
        else:
            _require(row, "prompt", "completion")
            prompt = _prompt_text(d["prompt"], tokenizer, row.where)
            completion = _completion_text(d["completion"], row.where, "completion")
        out.append({"prompt": prompt, "completion": completion, "where": row.where, **row_images(row)})
    return out


def prompt_records(rows: list[Row], tokenizer) -> list[dict]:
    """RL prompt rows: {'prompt': str | messages, ...other columns kept for the rewards (e.g. 'answer')}."""
    out = []
    for row in rows:
        _require(row, "prompt")
        rec = dict(row.data)
        rec["prompt"] = _prompt_text(row.data["prompt"], tokenizer, row.where)
        rec["where"] = row.where
        rec.pop("image", None)
        rec.update(row_images(row))
        out.append(rec)
    return out
