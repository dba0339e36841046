"""Reading datasets in TRL's formats, unchanged, from JSONL, parquet or a `datasets` folder.

Every row carries its location ("file.jsonl:12", "data.parquet row 3") so that a bad row is reported
with file, line and field. Preference rows may be:
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt {"chosen": str | [messages], "rejected": ...}   (the shared prefix is the prompt)
Prompt-completion rows for SFT: {"prompt", "completion"} (strings or messages), or {"messages": [...]}.
Images (TRL's columns): "images" (a list) or "image" (one), each a path (relative to the data file's
folder), {"bytes", "path"} (datasets' Image feature) or a PIL image; chat messages may hold image parts
({"type": "image"}) and video parts ({"type": "video"}), which become the '<image>' and '<video>'
placeholders. Every image is opened when the rows are read:
a missing or unreadable file is an error naming the row.
Video: a "video" column (a file path, a list of frame images or a frames array; data/video.py, whose VideoOptions the
record functions take as `video`) becomes a Video at the end of the row's "images" list, for the prompt's '<video>'
placeholder; it is decoded when the rows are read, and a bad one is an error naming the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError


@dataclass
class Row:
    """One row of a dataset, with where it came from (for error messages) and the folder of its images."""

    data: dict
    where: str  # "file.jsonl:12" or "folder row 3"
    base: str = ""  # folder that relative image paths start from


@dataclass
class SkipCounter:
    """Rows dropped for a reason are counted here and reported at the end of a run; none vanish silently."""

    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        """Count a row dropped for `reason`; the first row of each reason is kept for the report."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, where)

    notes: dict = field(default_factory=dict)  # rows kept but changed (reported like the skips)
    note_examples: dict = field(default_factory=dict)

    def note(self, reason: str, where: str) -> None:
        """Count a row kept but changed for `reason` (reported like the skips)."""
        self.notes[reason] = self.notes.get(reason, 0) + 1
        self.note_examples.setdefault(reason, where)

    @property
    def total(self) -> int:
        """The number of rows skipped, over every reason."""
        return sum(self.counts.values())

    def report(self) -> str:
        """One line: each reason with its count and its first row, then the notes."""
        parts = [f"{k}: {v} (first at {self.examples[k]})" for k, v in sorted(self.counts.items())]
        out = "skipped rows: " + ("; ".join(parts) if parts else "none")
        if self.notes:
            out += "; rows kept with " + "; ".join(
                f"{k}: {v} (first at {self.note_examples[k]})" for k, v in sorted(self.notes.items())
            )
        return out


def hub_rows(name: str, split: str = "train", config: str = "", revision: str = "") -> list[Row]:
    """Rows of a hub dataset by id, through datasets.load_dataset and its cache (config: the subset; revision:
    a branch, tag or commit). Not cached and no hub (HF_HUB_OFFLINE=1, or no network): one line naming the id."""
    import datasets

    from ..models.hf import offline_hint

    try:
        ds = datasets.load_dataset(name, config or None, split=split, revision=revision or None)
    except ValueError as e:  # a split or config that the dataset does not have: its own message says which
        raise DataError(f"dataset {name!r}: {str(e).splitlines()[0][:300]}") from e
    except Exception as e:  # noqa: BLE001 - connection and cache errors of several libraries: one line
        if "doesn't exist on the Hub" in str(e) or type(e).__name__ == "DatasetNotFoundError":
            if "offline" not in str(e).lower():
                raise DataError(f"dataset {name!r}: not found on the Hugging Face hub ({e})") from e
        raise DataError(offline_hint(name, "dataset", e)) from e
    where = f"{name}{'/' + config if config else ''} ({split})"
    rows = [Row(dict(r), f"{where} row {i}", "") for i, r in enumerate(ds)]
    if not rows:
        raise DataError(f"dataset {name!r}: split {split!r} is empty (no rows)")
    return rows


def load_rows(path: str | Path, split: str = "train", config: str = "", revision: str = "") -> list[Row]:
    """Rows of a .jsonl/.json-lines file, a .parquet file, a folder saved with Dataset.save_to_disk (a
    DatasetDict: the split named `split`), or a hub dataset id ('trl-lib/ultrafeedback_binarized': hub_rows).
    An empty file, invalid UTF-8 or JSON is an error naming the line."""
    from ..models.hf import is_hub_id

    if is_hub_id(str(path)):
        return hub_rows(str(path), split, config, revision)
    if config or revision:
        raise DataError(f"{path}: --data-config and --revision are for hub datasets; this is a local path")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"no such file or folder: {path} (data is a .jsonl or .parquet file, a datasets folder or a hub id)"
        )
    if p.is_file() and split != "train":
        raise DataError(
            f"--split {split!r}: {p} is one file, with no splits; --split chooses a split of a datasets folder or "
            "a hub dataset (leave it out for a file)"
        )
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise DataError(f"{p}: not a datasets folder saved with save_to_disk ({e})") from e
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{p}: no split {split!r}; its splits are {', '.join(ds)} (choose one with --split)")
            ds = ds[split]
        rows = [Row(dict(r), f"{p} row {i}", str(p)) for i, r in enumerate(ds)]
    elif p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p}: not a readable parquet file ({e})") from e
        rows = [Row(r, f"{p} row {i}", str(p.parent)) for i, r in enumerate(table.to_pylist())]
    elif p.suffix in (".jsonl", ".json"):
        rows = []
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark is not data
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}:{n}: invalid UTF-8 (byte {e.start} of the line)") from e
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{n}: malformed JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{p}:{n}: each line must be a JSON object, got {type(obj).__name__}")
                rows.append(Row(obj, f"{p}:{n}", str(p.parent)))
    else:
        raise DataError(f"{p}: unsupported format {p.suffix!r}; use .jsonl, .parquet or a datasets folder")
    if not rows:
        raise DataError(f"{p}: the dataset is empty (no rows)")
    return rows


def _require(row: Row, *fields: str) -> None:
    for f in fields:
        if f not in row.data:
            have = ", ".join(sorted(row.data)) or "none"
            raise DataError(f"{row.where}: missing field {f!r} (row has: {have})")
        if row.data[f] is None:
            raise DataError(f"{row.where}: field {f!r} is null")


ROLES = ("system", "user", "assistant", "tool")


def check_messages(x, where: str, field_name: str) -> None:
    """A list of chat messages: each a mapping with a known 'role' and a 'content' that is a string or a list
    of parts ({'type': 'text', 'text': str} or {'type': 'image'}). Raises DataError naming the message."""
    for i, m in enumerate(x):
        at = f"{where}: field {field_name!r} message {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}: a message must be a mapping with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{at}: unknown role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        c = m["content"]
        if c is None:
            raise DataError(f"{at}: 'content' is null")
        if isinstance(c, str):
            continue
        if not isinstance(c, list):
            raise DataError(f"{at}: 'content' must be a string or a list of parts, got {type(c).__name__}")
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "video") or (kind == "text" and isinstance(part.get("text"), str)):
                continue
            want = "{'type': 'text', 'text': str}, {'type': 'image'} or {'type': 'video'}"
            raise DataError(f"{at} part {j}: a part must be {want}, got {part!r}"[:300])


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def _message_text(messages, where: str = "", field_name: str = "") -> str:
    """The text of the assistant turns of a list of messages; with `where`, none is a DataError naming the row
    and field (a conversation of user turns only has no response to train on)."""
    from ..models.tokenizer import _content_text

    if where and not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
        raise DataError(
            f"{where}: field {field_name!r} has no assistant turn (its messages are {roles} only): the response "
            "must be an assistant message"
        )
    return "".join(_content_text(m["content"]) for m in messages if m["role"] == "assistant")


def _prompt_text(prompt, tokenizer, where: str, field_name: str = "prompt") -> str:
    from ..models.tokenizer import _content_text

    if isinstance(prompt, str):
        return prompt
    if _is_messages(prompt):  # contents flattened to text, image parts as the '<image>' placeholder
        check_messages(prompt, where, field_name)
        flat = [{"role": m["role"], "content": _content_text(m["content"])} for m in prompt]
        return tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    raise DataError(
        f"{where}: field {field_name!r} must be a string or a list of chat messages, got {type(prompt).__name__}"
    )


def _completion_text(x, where: str, field_name: str) -> str:
    if isinstance(x, str):
        return x
    if _is_messages(x):
        check_messages(x, where, field_name)
        return _message_text(x, where, field_name)
    raise DataError(
        f"{where}: field {field_name!r} must be a string or a list of chat messages, got {type(x).__name__}"
    )


def _split_implicit(chosen, rejected, tokenizer, where):
    """Implicit prompt: the longest shared prefix (messages, or characters of strings) is the prompt."""
    if _is_messages(chosen) and _is_messages(rejected):
        check_messages(chosen, where, "chosen")
        check_messages(rejected, where, "rejected")
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        if i == 0:
            raise DataError(f"{where}: implicit-prompt row: chosen and rejected share no leading message")
        return (
            _prompt_text(chosen[:i], tokenizer, where),
            _message_text(chosen[i:], where, "chosen"),
            _message_text(rejected[i:], where, "rejected"),
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        return chosen[:i], chosen[i:], rejected[i:]
    raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both be message lists")


def row_images(row: Row, video=None) -> dict:
    """{'images': [PIL images, then the Video of a 'video' column], 'image_base'} of a row with an 'images' or
    'image' or 'video' column, else {}. video: the VideoOptions that choose the frames (None: the defaults)."""
    from ..models.vision import load_image

    d = row.data
    raw = d.get("images")
    if raw is None and d.get("image") is not None:
        raw = [d["image"]]
    if raw is None and d.get("video") is None:
        return {}
    if raw is None:
        raw = []
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    images = []
    for i, x in enumerate(raw):
        where = f"{row.where} field 'images'[{i}]"
        images.append(load_image(decode_image_string(x, where), where, row.base))
    if d.get("video") is not None:
        from .video import VideoOptions, read_video

        images.append(read_video(d["video"], f"{row.where} field 'video'", row.base, video or VideoOptions()))
    return {"images": images, "image_base": row.base}


IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def decode_image_string(x, where: str):
    """An image given as text: a data: URI ('data:image/png;base64,...') or bare base64 of an image file becomes
    its bytes; any other string is a path, returned as it is. Base64 that does not decode is a DataError."""
    import base64
    import binascii
    import re

    if not isinstance(x, str):
        return x
    if x.startswith("data:"):
        head, sep, payload = x.partition(",")
        if not sep or ";base64" not in head:
            raise DataError(f"{where}: a data: URI image must be 'data:image/<type>;base64,<data>', got {x[:40]!r}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: the data: URI's base64 does not decode ({e})") from e
    if len(x) >= 64 and re.fullmatch(r"[A-Za-z0-9+/\s]+=*", x) and not Path(x).exists():
        try:
            data = base64.b64decode(x, validate=False)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: neither an image file nor base64 that decodes ({e}): {x[:40]!r}...") from e
        if not data.startswith(IMAGE_MAGIC):
            raise DataError(
                f"{where}: neither an image file nor base64 of an image (PNG, JPEG, GIF, WEBP, BMP, TIFF): {x[:32]!r}"
            )
        return data
    return x


def preference_records(rows: list[Row], tokenizer, skips: SkipCounter | None = None, video=None) -> list[dict]:
    """TRL preference rows -> [{'prompt', 'chosen', 'rejected', 'where'}] of strings. A row whose chosen
    equals its rejected response carries no preference: skipped and counted in `skips`. video: VideoOptions."""
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
        if chosen == rejected:
            if skips is not None:
                skips.add("chosen equals rejected", row.where)
            continue
        rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": row.where}
        out.append({**rec, **row_images(row, video)})
    return out


def _number(x, where: str, field_name: str) -> float:
    """A numeric field (a number, or a string holding one) as a float; anything else is a DataError naming it."""
    import math

    try:
        v = float(x) if not isinstance(x, bool) else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v):
        raise DataError(f"{where}: field {field_name!r} must be a finite number, got {str(x)[:40]!r}")
    return v


def completion_records(rows: list[Row], tokenizer, video=None) -> list[dict]:
    """SFT rows (prompt/completion, or messages ending in an assistant turn) -> [{'prompt', 'completion'}].
    video: VideoOptions."""
    out = []
    for row in rows:
        d = row.data
        if "messages" in d:
            msgs = d["messages"]
            if msgs is None:
                raise DataError(f"{row.where}: field 'messages' is null")
            if _is_messages(msgs):
                check_messages(msgs, row.where, "messages")
            if not _is_messages(msgs) or msgs[-1]["role"] != "assistant":
                raise DataError(f"{row.where}: field 'messages' must be chat messages ending with an assistant turn")
            prompt = _prompt_text(msgs[:-1], tokenizer, row.where, "messages")
            completion = _message_text(msgs[-1:])
        else:
            _require(row, "prompt", "completion")
            prompt = _prompt_text(d["prompt"], tokenizer, row.where)
            completion = _completion_text(d["completion"], row.where, "completion")
        out.append({"prompt": prompt, "completion": completion, "where": row.where, **row_images(row, video)})
    return out


def prompt_records(rows: list[Row], tokenizer, video=None) -> list[dict]:
    """RL prompt rows: {'prompt': str | messages, ...other columns kept for the rewards (e.g. 'answer')}.
    video: VideoOptions."""
    out = []
    for row in rows:
        _require(row, "prompt")
        rec = dict(row.data)
        rec["prompt"] = _prompt_text(row.data["prompt"], tokenizer, row.where)
        if rec.get("difficulty") is not None:  # the curriculum sampler's sort key
            rec["difficulty"] = _number(rec["difficulty"], row.where, "difficulty")
        rec["where"] = row.where
        rec.pop("image", None)
        rec.pop("video", None)
        rec.update(row_images(row, video))
        out.append(rec)
    return out
