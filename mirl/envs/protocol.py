"""How tool calls and their results appear in the model's tokens: a plain-text protocol, and the chat template's.

Plain (models without a chat template that renders tools: the tiny built-ins, whose context is 128-256
characters, so it is compact):

    What is 123*4567?                         the opening: the messages' text, one per line
    <calc>123*4567</calc>                     a call: <NAME>ARG</NAME>
    <result>561741</result>                   its result, appended by the environment
    561741<eos>                               a turn without a call: the answer (a turn ends at EOS)

ARG is the raw text when the tool has exactly one parameter and it is a string, else a JSON object of the
arguments (`<add>{"a": 1, "b": 2}</add>`). The stop strings are `</NAME>` for every tool, so a turn ends at its
first complete call. A reply that is not a tool result (a game's "higher") is its text and a newline. Only the
tools' names are read as calls (other `<tag>`s are text); an opened call never closed, JSON that does not parse
or is not an object is a malformed call: its error goes back to the model as the result.

Chat template (`chat=True`): the messages go through the tokenizer's template. When the template renders tools
(it takes `tools` and documents the Hermes / Qwen2.5 form `<tool_call>`), the tool schemas go to it and the model
calls as the template taught it:

    <tool_call>
    {"name": "calc", "arguments": {"expression": "123*4567"}}
    </tool_call>

with the stop string `</tool_call>`; results are `tool` messages rendered by the template. A template without
tools (SmolLM2-135M-Instruct's is plain ChatML) gets the plain protocol: the tools are described in a preamble
joined to the system message, and the results come back as user messages `<result>...</result>`. The tokens
after a model turn are the template's own: the reply messages rendered after a dummy conversation minus the
dummy itself, plus the template's end-of-turn when a stop string (not EOS) ended the turn.
"""

from __future__ import annotations

import json
import re

from .base import Tool, ToolCall
from .tools import single_string_parameter

RESULT = ("<result>", "</result>")
HERMES = ("<tool_call>", "</tool_call>")
_SENTINEL = "\x1fmirl-turn\x1f"  # the dummy assistant turn's text, found again in the rendered template


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tools in the Hermes / Qwen2.5 form (it mentions `tools` and
    `<tool_call>`); a template that takes tools in another form is used with the plain protocol."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: transformers picks "tool_use" when tools are given
        template = template.get("tool_use") or template.get("default") or ""
    return isinstance(template, str) and "tools" in template and HERMES[0] in template


def message_text(message: dict) -> str:
    """A message's content as text (content parts joined; an image part becomes the image placeholder)."""
    from ..models.tokenizer import IMAGE_PLACEHOLDER

    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if isinstance(p, dict) and p.get("type") == "text":
            parts.append(p.get("text", ""))
        elif isinstance(p, dict) and p.get("type") == "image":
            parts.append(IMAGE_PLACEHOLDER)
    return "".join(parts)


def plain_call(tool: Tool, arguments: dict) -> str:
    """The plain protocol's call text: `<NAME>ARG</NAME>` (what a demonstration for SFT writes)."""
    raw = single_string_parameter(tool)
    arg = arguments[raw] if raw is not None and raw in arguments else json.dumps(arguments)
    return f"<{tool.name}>{arg}</{tool.name}>"


def hermes_call(name: str, arguments: dict) -> str:
    """The Hermes / Qwen2.5 call text."""
    return f"{HERMES[0]}\n{json.dumps({'name': name, 'arguments': arguments})}\n{HERMES[1]}"


def parse_plain(text: str, tools: list[Tool]) -> list[ToolCall]:
    """The plain-protocol calls in a model turn, in order; [] when none."""
    by_name = {t.name: t for t in tools}
    if not by_name:
        return []
    names = "|".join(re.escape(n) for n in sorted(by_name, key=len, reverse=True))
    calls, pos = [], 0
    opener = re.compile(f"<({names})>")
    while (m := opener.search(text, pos)) is not None:
        name = m.group(1)
        close = text.find(f"</{name}>", m.end())
        if close < 0:
            calls.append(ToolCall(name, {}, error=f"unclosed call: write <{name}>...</{name}>"))
            break
        calls.append(_plain_arguments(by_name[name], text[m.end() : close]))
        pos = close + len(name) + 3
    return calls


def _plain_arguments(tool: Tool, arg: str) -> ToolCall:
    """One plain call's ARG -> the ToolCall (raw string or JSON object)."""
    raw = single_string_parameter(tool)
    if raw is not None:
        return ToolCall(tool.name, {raw: arg})
    try:
        args = json.loads(arg) if arg.strip() else {}
    except json.JSONDecodeError as e:
        return ToolCall(tool.name, {}, error=f"bad arguments for {tool.name}: not JSON ({e.msg})")
    if not isinstance(args, dict):
        return ToolCall(tool.name, {}, error=f"bad arguments for {tool.name}: not a JSON object")
    return ToolCall(tool.name, args)


def parse_hermes(text: str, tools: list[Tool]) -> list[ToolCall]:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls in a model turn; [] when none."""
    names = {t.name for t in tools}
    calls, pos = [], 0
    while (start := text.find(HERMES[0], pos)) >= 0:
        end = text.find(HERMES[1], start)
        if end < 0:
            calls.append(ToolCall("", {}, error=f"unclosed call: {HERMES[0]} without {HERMES[1]}"))
            break
        calls.append(_hermes_one(text[start + len(HERMES[0]) : end], names))
        pos = end + len(HERMES[1])
    return calls


def _hermes_one(body: str, names: set[str]) -> ToolCall:
    """One Hermes call's JSON -> the ToolCall (arguments as an object, or as a JSON string of one)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", {}, error=f"bad tool call: not JSON ({e.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", {}, error='bad tool call: write {"name": ..., "arguments": {...}}')
    name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(name, {}, error=f"bad arguments for {name}: not a JSON object")
    if name not in names:
        return ToolCall(name, args, error=f"unknown tool {name!r}; the tools are: {', '.join(sorted(names)) or 'none'}")
    return ToolCall(name, args)


def tool_preamble(tools: list[Tool]) -> str:
    """The plain protocol described in words, for a chat template without tools (joined to the system message)."""
    lines = ["You can call tools. To call one, write <NAME>ARG</NAME>; its result comes back as <result>...</result>."]
    for t in tools:
        raw = single_string_parameter(t)
        if raw is not None:
            lines.append(f"- <{t.name}>{raw}</{t.name}>: {t.description}")
        else:
            props = t.parameters.get("properties") or {}
            args = ", ".join(f'"{k}": {v.get("type", "value")}' for k, v in props.items())
            lines.append(f"- <{t.name}>{{{args}}}</{t.name}>: {t.description}")
    lines.append("Without a tool call, your message is your answer.")
    return "\n".join(lines)


class Renderer:
    """The tokens of an episode for one tokenizer and one tool list: the opening, the stop strings, the calls in
    a model turn, the tokens of the environment's replies and the final answer.

    chat: render through the tokenizer's chat template (a template that renders tools gets the Hermes protocol,
    one that does not the plain protocol with a preamble); False: the plain protocol on raw text."""

    def __init__(self, tokenizer, tools: list[Tool], chat: bool):
        self.tokenizer = tokenizer
        self.tools = list(tools)
        self.chat = bool(chat)
        self.native = self.chat and bool(self.tools) and supports_tools(tokenizer)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The strings that end a turn at a complete call."""
        if not self.tools:
            return ()
        return (HERMES[1],) if self.native else tuple(f"</{t.name}>" for t in self.tools)

    def call_text(self, name: str, arguments: dict) -> str:
        """The text of a call as the model should write it (for demonstrations)."""
        if self.native:
            return hermes_call(name, arguments)
        return plain_call(next(t for t in self.tools if t.name == name), arguments)

    def parse(self, text: str) -> list[ToolCall]:
        """The calls in one model turn ([] when none); a malformed call is a ToolCall with its error set."""
        return parse_hermes(text, self.tools) if self.native else parse_plain(text, self.tools)

    def final_answer(self, text: str) -> str:
        """The model turn without its call markup (complete calls and an unclosed one at the end)."""
        if self.native:
            text = re.sub(re.escape(HERMES[0]) + r".*?(" + re.escape(HERMES[1]) + r"|$)", "", text, flags=re.S)
        else:
            for t in self.tools:
                n = re.escape(t.name)
                text = re.sub(f"<{n}>.*?(</{n}>|$)", "", text, flags=re.S)
        return text.strip()

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        """The chat template's text of messages (with the tool schemas when the template renders tools)."""
        tools = [t.schema() for t in self.tools] if self.native else None
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _with_preamble(self, messages: list[dict]) -> list[dict]:
        """The messages with the tool preamble joined to the system message (a chat template without tools)."""
        if self.native or not self.tools:
            return list(messages)
        pre = tool_preamble(self.tools)
        if messages and messages[0].get("role") == "system":
            return [{**messages[0], "content": message_text(messages[0]) + "\n\n" + pre}, *messages[1:]]
        return [{"role": "system", "content": pre}, *messages]

    def opening_text(self, messages: list[dict]) -> str:
        """The prompt up to and including the assistant's generation prompt, as text."""
        if self.chat:
            return self._template(self._with_preamble(messages), True)
        return "".join(message_text(m) + "\n" for m in messages)

    def opening(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids (plain: with BOS, as mirl encodes a prompt; chat: as the template writes it)."""
        return self.tokenizer.encode(self.opening_text(messages), add_special_tokens=not self.chat)

    def _as_template_replies(self, messages: list[dict]) -> list[dict]:
        """Replies for a template without tools: consecutive tool results become one user message."""
        out = []
        for m in messages:
            if m.get("role") != "tool":
                out.append(m)
                continue
            text = f"{RESULT[0]}{message_text(m)}{RESULT[1]}"
            if out and out[-1].get("_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + text}
            else:
                out.append({"role": "user", "content": text, "_results": True})
        return [{k: v for k, v in m.items() if k != "_results"} for m in out]

    def reply_text(self, messages: list[dict], ended_with_eos: bool) -> str:
        """The text after a model turn: the replies, then (chat) the next generation prompt. ended_with_eos: whether
        the model's turn ended with EOS (else a stop string cut it and the template's end-of-turn comes first)."""
        if not self.chat:
            return "".join(
                f"{RESULT[0]}{message_text(m)}{RESULT[1]}" if m.get("role") == "tool" else message_text(m) + "\n"
                for m in messages
            )
        replies = messages if self.native else self._as_template_replies(messages)
        dummy = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        head = self._template(dummy, False)
        full = self._template(dummy + replies, True)
        if not full.startswith(head) or _SENTINEL not in head:
            raise ValueError(
                "the chat template renders a conversation differently once messages follow it; "
                "its replies cannot be appended turn by turn"
            )
        end_of_turn = head[head.rindex(_SENTINEL) + len(_SENTINEL) :]
        eos = self.tokenizer.eos_token or ""
        if ended_with_eos and eos and end_of_turn.startswith(eos):
            end_of_turn = end_of_turn[len(eos) :]
        return end_of_turn + full[len(head) :]

    def reply_tokens(self, messages: list[dict], ended_with_eos: bool) -> list[int]:
        """The token ids to append after a model turn (reply_text's; plain: an EOS id first when the turn did not
        end with one and the reply is not a tool result)."""
        if not self.chat:
            ids = self.tokenizer.encode(self.reply_text(messages, True), add_special_tokens=False)
            needs_eos = not ended_with_eos and messages and messages[0].get("role") != "tool"
            return ([self.tokenizer.eos_token_id] if needs_eos else []) + ids
        return self.tokenizer.encode(self.reply_text(messages, ended_with_eos), add_special_tokens=False)
