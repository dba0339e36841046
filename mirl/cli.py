"""`mirl <command>`: flags generated from each recipe's Config dataclass; `--config x.yaml` overrides.

Precedence: dataclass defaults < YAML file < command-line flags. An unknown YAML key or loss name is
an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

import yaml

from .options import ConfigError, check_config

COMMANDS = {
    "sft": ("mirl.recipes.sft", "train", "supervised fine-tuning"),
    "dpo": ("mirl.recipes.preference", "train", "offline preference optimisation: DPO family, MIO, MI bounds"),
    "grpo": ("mirl.recipes.grpo", "train", "GRPO family: Dr. GRPO, DAPO, GSPO, RLOO, KL schedules"),
    "online": ("mirl.recipes.online", "train", "online contrastive fine-tuning: MIO/DPO/group losses on samples"),
    "ppo": ("mirl.recipes.ppo", "train", "PPO with a value head or a separate critic, GAE, KL penalty"),
    "distill": (
        "mirl.recipes.distill",
        "train",
        "on-policy distillation: reverse KL / JSD to a teacher on the student's samples",
    ),
    "iterate": (
        "mirl.experiments.iterate",
        "train",
        "iterative SFT <-> RL: rejection-sampled SFT then GRPO, N rounds",
    ),
    "prm": ("mirl.recipes.prm", "train", "process reward model on step labels (verifier or Monte-Carlo rollouts)"),
    "rm": ("mirl.recipes.reward_model", "train", "Bradley-Terry reward model on preference pairs"),
    "eval": ("mirl.eval", "run", "held-out accuracy and pass@k on a task"),
    "report": ("mirl.report", "run", "PNG plots and one HTML page of one or more runs' metrics"),
    "experiment": ("mirl.experiments", "run", "the papers' claims as commands: mio-vs-dpo, starvation, rft-compare"),
    "demo": ("mirl.demo", "run", "the default job: a weak SFT start, GRPO, DPO vs MIO on sampled pairs (CPU, ~3 min)"),
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        """A mapping whose keys are checked for repeats before PyYAML builds it."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _field_type(f: dataclasses.Field):
    t = f.type
    if isinstance(t, str):  # (from __future__ import annotations): "bool | None" is a bool option that may be unset
        t = {"int": int, "float": float, "str": str, "bool": bool}.get(t.removesuffix(" | None"), str)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _field_help(cls) -> dict[str, str]:
    """Each field's doc: the comment after it in the dataclass source, joined with the comment-only lines right
    below it that continue it (a line starting `# --` is a section's heading, not a continuation)."""
    import inspect

    helps, last = {}, None
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            line = line.strip()
            if line.startswith("#") and not line.startswith("# --") and last:
                helps[last] += " " + line[1:].strip()
            elif ":" in line and "#" in line and not line.startswith("#"):
                last = line.split(":", 1)[0].strip()
                helps[last] = line.split("#", 1)[1].strip()
            else:
                last = None
    return helps


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of a Config dataclass, typed from its annotation, with the field's comment as help and
    its choices (options.choice, choice_list) after the flag, as argparse writes them: --loss-agg {grpo,bnpo,...}.
    The choices are not given to argparse to check: check_config does, for the flags and the --config file alike,
    with one message (`--loss-agg 'x': must be one of ...`), and a comma list is not one of its items."""
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        t = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = "auto" if f.default is None else repr(f.default)  # (None: decided at the start, mirl/device.py)
        h = f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse formats help with %
        choices = f.metadata.get("choices")
        shown = "{" + ",".join(choices) + "}" + ("[,...]" if f.metadata.get("comma") else "") if choices else None
        if t is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h
            )
        else:
            parser.add_argument(flag, dest=f.name, type=t, default=argparse.SUPPRESS, help=h, metavar=shown)


def load_yaml_overrides(path: str | Path, cls) -> dict:
    """A YAML mapping of option: value, each checked against the option's type. As a user means them:
    `lr: 1e-4` (a string to YAML 1.1) is the float 1e-4; `steps: true` is an error, not 1."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder; --config takes a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader: no Python objects are built
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value at the top level")
    valid = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            raise ConfigError(f"{p}: unknown key {key!r}; valid keys: {', '.join(sorted(valid))}")
        t = _field_type(valid[name])
        if t is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, t) or (isinstance(value, bool) and t is not bool):
            raise ConfigError(f"{p}: key {key!r} must be {_TYPE_WORDS.get(t, t.__name__)}, got {value!r}")
        out[name] = value
    return out


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def build_config(cls, args: argparse.Namespace):
    """The Config of a command: dataclass defaults < the --config YAML file < flags; every option checked."""
    values = {}
    if getattr(args, "config", None):
        values.update(load_yaml_overrides(args.config, cls))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    cfg = cls(**values)
    check_config(cfg)
    return cfg


# commands whose first arguments may be given without a flag: `mirl report RUN_A RUN_B`, `mirl experiment NAME`
POSITIONAL = {"report": ("runs", True), "experiment": ("name", False)}


def _positionals_to_flags(cmd: str, argv: list[str]) -> list[str]:
    """`report A B --out X` -> `report --runs A,B --out X`; `experiment starvation` -> `--name starvation`."""
    if cmd not in POSITIONAL:
        return argv
    flag, many = POSITIONAL[cmd]
    rest, pos = argv[1:], []
    while rest and not rest[0].startswith("-") and (many or not pos):
        pos.append(rest.pop(0))
    return [cmd] + ([f"--{flag}", ",".join(pos)] if pos else []) + rest


def parse_command(argv: list[str]):
    """`mirl <command> [flags]` -> (command, its module, the parsed namespace, the Config class). argparse's
    own errors (an unknown flag, a bad number) print the usage and exit 2."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="mirl",
        description="post-training with preference optimisation (DPO family, MIO) and reinforcement fine-tuning",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)
    cmd = argv[0]
    if cmd not in COMMANDS:
        parser.error(f"unknown command {cmd!r}; valid: {', '.join(COMMANDS)}")
    mod_name, _, help_text = COMMANDS[cmd]
    argv = _positionals_to_flags(cmd, argv)
    mod = importlib.import_module(mod_name)
    p = sub.add_parser(cmd, help=help_text, description=(mod.__doc__ or "").strip().split("\n\n")[0])
    p.add_argument("--config", help="YAML file of option: value overrides")
    add_dataclass_flags(p, mod.Config)
    return cmd, mod, parser.parse_args(argv), mod.Config


def main(argv: list[str] | None = None) -> int:
    """The `mirl` command: parse, check every option, run; bad input exits 2 with one line naming it."""
    import time

    import torch

    from .checkpoint import CheckpointError
    from .device import LOWER_MEMORY, DeviceOutOfMemory
    from .distributed import is_main, shutdown
    from .optim import TrainingDiverged
    from .recipes.run import Interrupted
    from .stop import StopRequested

    _START["t"] = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    cmd, mod, args, cls = parse_command(argv)
    fn_name = COMMANDS[cmd][1]
    cfg = None
    try:
        cfg = build_config(cls, args)
        if cmd in ("dpo", "online"):
            from .losses import parse_loss_spec

            parse_loss_spec(cfg.loss)
        result = getattr(mod, fn_name)(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mirl {cmd}: error: {e}", file=sys.stderr)
        shutdown(ok=False)
        return 2
    except OSError as e:  # a file that cannot be read or written: its name and the reason, in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"mirl {cmd}: error: {where}{e.strerror or e}", file=sys.stderr)
        shutdown(ok=False)
        return 2
    except (TrainingDiverged, CheckpointError) as e:
        print(f"mirl {cmd}: stopped: {e}", file=sys.stderr)
        shutdown(ok=False)
        return 1
    except (DeviceOutOfMemory, torch.cuda.OutOfMemoryError) as e:  # one line, not the allocator's page
        said = str(e) if isinstance(e, DeviceOutOfMemory) else f"out of GPU memory; to use less, lower {LOWER_MEMORY}"
        print(f"mirl {cmd}: stopped: {said}; {_last_checkpoint(cmd, cfg)}", file=sys.stderr)
        shutdown(ok=False)
        return 1
    except Interrupted as e:
        if is_main():
            where = (
                (
                    f"the checkpoint of step {e.step} is in {Path(e.out_dir) / 'checkpoint'}; resume with the same "
                    "command and --resume"
                )
                if e.saved
                else "no checkpoint is written under --fsdp"
            )
            print(f"mirl {cmd}: stopped by {e.signal_name} after step {e.step}: {where}", file=sys.stderr)
        shutdown(ok=False)
        return 130
    except StopRequested as e:  # a signal while the run waited in the middle of a step (a reward function)
        if is_main():
            print(f"mirl {cmd}: stopped by {e.signal_name} {e.where}: {_last_checkpoint(cmd, cfg)}", file=sys.stderr)
        shutdown(ok=False)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: at once, wherever the run was
        if is_main():
            print(f"mirl {cmd}: stopped at once by SIGINT (Ctrl-C): {_last_checkpoint(cmd, cfg)}", file=sys.stderr)
        shutdown(ok=False)
        return 130
    if cmd not in ("eval", "demo", "report", "experiment") and is_main():
        import json

        print(json.dumps({k: v for k, v in result.summary.items() if k != "config"}, default=str))
    shutdown()
    return 0


_START = {"t": None}


def _clock() -> float:
    """Seconds since main() started (a checkpoint older than that is an earlier run's)."""
    import time

    return time.monotonic() - (_START["t"] or time.monotonic())


def _last_checkpoint(cmd: str, cfg) -> str:
    """What a run stopped in the middle of a step left behind: its last checkpoint, if any."""
    import time

    out = Path(getattr(cfg, "out_dir", "") or ".")
    state = out / "checkpoint" / "state.json"
    resumed = getattr(cfg, "resume", False)
    if cfg is not None and state.exists() and (resumed or state.stat().st_mtime >= time.time() - _clock()):
        return (
            f"the unfinished step was not saved; the last checkpoint is in {out / 'checkpoint'}: resume with the "
            "same command and --resume"
        )
    if cmd == "iterate" and cfg is not None and (out / "iterate.json").exists():
        return f"the finished phases are in {out}: resume with the same command and --resume"
    if not getattr(cfg, "out_dir", ""):
        return "nothing was written"
    return "the unfinished step was not saved, and no checkpoint had been written yet"


if __name__ == "__main__":
    raise SystemExit(main())
