"""Every command that README.md and docs/*.md show parses with the CLI: its flags exist, its values pass the
option checks and any --config file it names loads. (Running them is the job of the other tests: the quick
forms of the recipes, the experiments' --quick runs and the demo.)"""

import re
import shlex
from pathlib import Path

import pytest

from mirl.cli import build_config, parse_command

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands():
    """(page, line number, argv after `mirl`) of every `mirl ...` or `torchrun ... -m mirl ...` code line."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            line, start = lines[i], i + 1
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # continued on the next line
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            code = line[4:] if line.startswith("    ") else ""
            code = re.split(r"\s+#\s", code, maxsplit=1)[0].strip()  # a trailing comment
            if "..." in code or "<" in code:
                continue  # a placeholder, not a command
            words = shlex.split(code) if code.split(" ", 1)[0] in ("mirl", "torchrun") else []
            if words[:1] == ["mirl"]:
                out.append((page.name, start, words[1:]))
            elif words[:1] == ["torchrun"] and "-m" in words and words[words.index("-m") + 1] == "mirl":
                out.append((page.name, start, words[words.index("-m") + 2 :]))
    return out


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 30 and {c[2][0] for c in COMMANDS} >= {
        "sft",
        "dpo",
        "grpo",
        "online",
        "ppo",
        "rm",
        "eval",
        "report",
        "experiment",
        "demo",
    }


@pytest.mark.parametrize("argv", [c[2] for c in COMMANDS], ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_shown_command_parses(argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository
    _, _, args, cls = parse_command(argv)
    build_config(cls, args)  # every option checked, the YAML file loaded
