"""--env SPEC -> a factory of environments (one instance per episode) and a name.

    calc, guess, python, zoom      the built-ins (envs/builtin.py; python: envs/python_env.py)
    path/to/file.py:Class          a class in a Python file (imported once, in the training process)
    package.module:Class           a class in an importable module

The class is either a mirl environment (envs/base.py: `tools`, `reset(example) -> messages`,
`step(message) -> Step`; a tool may be a Tool or a documented, type-hinted function) or follows TRL's
`environment_factory` convention unchanged (no `step`):

    class Wordle:
        def reset(self, **row) -> str | None     # None, or text appended to the row's prompt (its last message)
        def guess(self, word: str) -> str        # every public method is a tool (docstring + type hints)
        def get_reward(self) -> float            # optional: the episode's reward

which runs as: reset(example) calls reset(**example) and opens with the row's "prompt" (a string or messages)
plus what reset returned (a row without a prompt opens with reset's text alone); a turn without a tool call
ends the episode with get_reward() (None when the class has none: the run's reward functions score the final
answer), and so does finish() at the turn limit. The class is built once here, so that a missing docstring or
type hint is an error now rather than in the middle of a run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from ..options import ConfigError
from .base import Step, Tool
from .tools import as_tool, tool_from_function

BUILTIN = {
    "calc": ("mirl.envs.builtin", "CalcEnv"),
    "guess": ("mirl.envs.builtin", "GuessEnv"),
    "python": ("mirl.envs.python_env", "PythonEnv"),
    "zoom": ("mirl.envs.zoom", "ZoomEnv"),
}
TRL_RESERVED = ("reset", "get_reward")  # methods of a TRL environment that are not tools


class TRLEnv:
    """A TRL-convention environment (reset(**row), public methods as tools, optional get_reward()) as a mirl one."""

    def __init__(self, env):
        self.env = env
        names = [
            n
            for n, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if not n.startswith("_") and n not in TRL_RESERVED
        ]
        self.tools = [tool_from_function(getattr(env, n), n) for n in names]

    def reset(self, example: dict) -> list[dict]:
        """reset(**example); the row's prompt plus what it returned."""
        obs = self.env.reset(**example)
        prompt = example.get("prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
        if isinstance(obs, list) and all(isinstance(m, dict) and "role" in m for m in obs):
            return messages + obs
        if obs is None:
            return messages
        if not messages:
            return [{"role": "user", "content": obs}]
        last = messages[-1]
        content = last.get("content") or ""
        if isinstance(content, str) and isinstance(obs, str):
            content = content + obs
        else:  # content parts (TRL: text parts and images)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            content = parts + ([{"type": "text", "text": obs}] if isinstance(obs, str) else list(obs))
        return messages[:-1] + [{**last, "content": content}]

    def _reward(self) -> float | None:
        fn = getattr(self.env, "get_reward", None)
        return None if fn is None else fn()

    def step(self, message: str) -> Step:
        """A turn without a tool call: the episode ends, with get_reward() when the class has it."""
        return Step(reward=self._reward(), done=True)

    def finish(self) -> float | None:
        """The turn limit: get_reward() when the class has it."""
        return self._reward()


def _native(cls):
    """A mirl environment with its tools as Tool objects (a function in `tools` gets its schema)."""
    env = cls()
    tools = list(getattr(env, "tools", None) or [])
    if not all(isinstance(t, Tool) for t in tools):
        env.tools = [as_tool(t) for t in tools]
    return env


def _trl(cls):
    return TRLEnv(cls())


def _import_file(path: str, spec: str):
    """The module of a Python file, imported once."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--env {spec}: no such file {path}")
    key = f"mirl_user_env_{abs(hash(str(p.resolve())))}"
    if key in sys.modules:
        return sys.modules[key]
    mspec = importlib.util.spec_from_file_location(key, p)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[key] = module  # dataclasses and pickling look the module up by name
    try:
        mspec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[key]
        raise ConfigError(f"--env {spec}: {path}:{e.lineno}: syntax error ({e.msg})") from e
    except BaseException as e:  # noqa: BLE001 - user code: any failure is the file's
        del sys.modules[key]
        raise ConfigError(f"--env {spec}: importing {path} raised {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--env {spec}: no module {e.name!r}") from e
    except BaseException as e:  # noqa: BLE001
        raise ConfigError(f"--env {spec}: importing {name} raised {type(e).__name__}: {e}") from e


def _find_class(spec: str):
    """The class a spec names (a built-in, file.py:Class or package.module:Class)."""
    if spec in BUILTIN:
        module_name, attr = BUILTIN[spec]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            raise ConfigError(f"--env {spec}: this built-in environment is not available yet") from e
        return getattr(module, attr)
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(
            f"--env {spec!r}: not a built-in ({', '.join(BUILTIN)}) nor path/to/file.py:Class or package.module:Class"
        )
    module = _import_file(where, spec) if where.endswith(".py") else _import_module(where, spec)
    obj = getattr(module, attr, None)
    if obj is None:
        classes = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_"))
        raise ConfigError(f"--env {spec}: {where} has no {attr!r}; its classes: {', '.join(classes) or 'none'}")
    if not inspect.isclass(obj):
        raise ConfigError(f"--env {spec}: {attr} is a {type(obj).__name__}, not a class")
    return obj


def load_env(spec: str):
    """--env SPEC -> (factory: () -> a fresh environment, name). A ConfigError naming --env when the file, module
    or class is missing, the class is not an environment, or a tool lacks a docstring or type hints."""
    cls = _find_class(spec)
    if not callable(getattr(cls, "reset", None)):
        raise ConfigError(
            f"--env {spec}: {cls.__name__} has no reset(); an environment defines reset(example) and step(message) "
            "(mirl), or reset(**row) and its tools as methods (TRL's convention)"
        )
    trl = not callable(getattr(cls, "step", None))
    factory = functools.partial(_trl if trl else _native, cls)
    try:
        env = factory()
    except ConfigError as e:
        raise ConfigError(f"--env {spec}: {e}") from e
    except Exception as e:  # noqa: BLE001 - user code
        raise ConfigError(f"--env {spec}: building {cls.__name__}() raised {type(e).__name__}: {e}") from e
    if trl and not env.tools and not hasattr(env.env, "get_reward"):
        raise ConfigError(
            f"--env {spec}: {cls.__name__} has reset() but no step(), no tool methods and no get_reward(): "
            "nothing for the model to act on"
        )
    where = spec.rpartition(":")[0]
    return factory, f"{Path(where).name}:{cls.__name__}" if where.endswith(".py") else spec
