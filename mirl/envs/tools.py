"""Tools from plain Python functions: the JSON schema from the signature and the docstring, and a checked call.

    def calc(expression: str) -> str:
        '''Evaluate integer arithmetic: + - * / and parentheses.

        Args:
            expression: the arithmetic, e.g. "12*(3+4)"
        '''

    tool = tool_from_function(calc)        # Tool(name="calc", description=..., parameters={...}, fn=calc)
    call_tool(tool, {"expression": "2*3"}) # "6"
    call_tool(tool, {"expr": "2*3"})       # "bad arguments for calc: unknown argument 'expr'; ..."

The schema is transformers' (`transformers.utils.get_json_schema`, what `apply_chat_template(tools=[fn])` does
with a function), so a function renders the same through mirl and through a chat template: str, int, float,
bool, list[...], dict, Optional / `X | None` (nullable), a parameter with a default is not required; every
parameter needs a type hint and a line in a Google-style `Args:` section. The description is the docstring's
first paragraph only (the model reads it on every prompt).
"""

from __future__ import annotations

import inspect

from ..options import ConfigError
from .base import Tool

_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


def tool_from_function(fn, name: str | None = None) -> Tool:
    """A Tool from a documented, type-hinted function or bound method (name: the function's own by default).
    A function without a docstring, a parameter without a type hint or without an `Args:` line, or *args / **kwargs:
    a ConfigError naming the tool."""
    from transformers.utils import chat_template_utils as ctu

    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    if not callable(fn):
        raise ConfigError(f"tool {name}: {type(fn).__name__} is not callable")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tool {name}: its signature cannot be read ({e})") from e
    star = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if star:
        raise ConfigError(f"tool {name}: *args / **kwargs ({', '.join(star)}) cannot be described to the model")
    if not (inspect.getdoc(fn) or "").strip():
        raise ConfigError(f"tool {name} has no docstring: the model needs one (a description and an Args: section)")
    try:
        schema = ctu.get_json_schema(fn)["function"]
    except (ctu.DocstringParsingException, ctu.TypeHintParsingException) as e:
        raise ConfigError(f"tool {name}: {e}") from e
    description = schema.get("description", "").split("\n\n")[0].strip()
    return Tool(name, description, schema.get("parameters") or {"type": "object", "properties": {}}, fn)


def as_tool(x) -> Tool:
    """A Tool as it is; a function or bound method through tool_from_function."""
    return x if isinstance(x, Tool) else tool_from_function(x)


def single_string_parameter(tool: Tool) -> str | None:
    """The name of the tool's parameter when it has exactly one and it is a string (the plain protocol then takes
    the raw text as the argument); None otherwise."""
    props = tool.parameters.get("properties") or {}
    if len(props) != 1:
        return None
    ((pname, spec),) = props.items()
    return pname if spec.get("type") == "string" else None


def _type_error(value, spec: dict, where: str) -> str | None:
    """Why value does not fit the JSON-schema spec (type, nullable, enum, array items); None when it does."""
    if value is None and spec.get("nullable"):
        return None
    types = spec.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if types:
        ok = any(
            isinstance(value, _JSON_TYPES.get(t, object))
            and not (t in ("integer", "number") and isinstance(value, bool))
            for t in types
        )
        if not ok:
            return f"{where} must be {' or '.join(types)}, got {type(value).__name__} {str(value)[:40]!r}"
    if "enum" in spec and value not in spec["enum"]:
        return f"{where} must be one of {spec['enum']}, got {str(value)[:40]!r}"
    if isinstance(value, (list, tuple)) and isinstance(spec.get("items"), dict):
        for k, v in enumerate(value):
            bad = _type_error(v, spec["items"], f"{where}[{k}]")
            if bad:
                return bad
    return None


def check_arguments(tool: Tool, arguments) -> str | None:
    """Why `arguments` do not fit the tool's parameters (not an object, unknown, missing or of the wrong type);
    None when they fit.

    >>> check_arguments(Tool("f", "", {"type": "object", "properties": {"n": {"type": "integer"}}}, print), {"n": "3"})
    "argument 'n' must be integer, got str '3'"
    """
    if not isinstance(arguments, dict):
        return f"the arguments must be a JSON object, got {type(arguments).__name__}"
    props = tool.parameters.get("properties") or {}
    unknown = [k for k in arguments if k not in props]
    if unknown:
        return f"unknown argument {unknown[0]!r}; the arguments are: {', '.join(props) or 'none'}"
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    for k, v in arguments.items():
        bad = _type_error(v, props[k], f"argument {k!r}")
        if bad:
            return bad
    return None


def call_tool(tool: Tool, arguments) -> str:
    """Run the tool on checked arguments -> its result; arguments that do not fit -> the string the model sees,
    'bad arguments for NAME: why'. What the tool itself raises or returns is not checked here: the EnvHost
    (envs/host.py) counts a raise, a non-string or an oversized result as a fault."""
    bad = check_arguments(tool, arguments)
    if bad is not None:
        return f"bad arguments for {tool.name}: {bad}"
    return tool.fn(**arguments)
