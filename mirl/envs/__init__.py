"""Multi-turn environments and tools (issue 27): the interface (base.py), tools from functions (tools.py), how
calls and results appear in tokens (protocol.py), the built-ins (builtin.py: calc, guess; sandbox.py: python),
--env loading (loader.py) and the worker that runs environments with faults counted (host.py).
Guide: docs/agents.md."""

from .base import Env, Step, Tool, ToolCall
from .host import EnvHost, Fault
from .loader import load_env
from .protocol import Renderer
from .tools import call_tool, tool_from_function

__all__ = [
    "Env",
    "EnvHost",
    "Fault",
    "Renderer",
    "Step",
    "Tool",
    "ToolCall",
    "call_tool",
    "load_env",
    "tool_from_function",
]
