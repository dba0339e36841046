"""Multi-turn episodes (rollout/episodes.py) with a scripted engine and environment: the token layout, the
masks and log-probs of a two-turn episode derived by hand, the ends (budget, fault, turn limit), and that the
environment's tokens carry no gradient through the policy loss."""

import re
from types import SimpleNamespace

import pytest
import torch

from mirl.envs.base import Step, ToolCall
from mirl.models.tokenizer import CharTokenizer
from mirl.rollout.engine import to_rollout
from mirl.rollout.episodes import run_episodes
from mirl.rollout.score import pack_rows

TOK = CharTokenizer()
EOS = TOK.eos_token_id


class ScriptedEngine:
    """Answers each live row's turn from a script: script[row][turn] = (text, ends with EOS)."""

    def __init__(self, script, tok=None):
        self.script, self.calls, self.tok = script, [], tok or TOK

    def generate(self, prompts, n, settings, *, generator=None, seeds=None, **_):
        live = [r for r in range(len(self.script)) if self.turn[r] < len(self.script[r])][: len(prompts)]
        rows_ids, rows_lp, cut = [], [], []
        for r in live:
            text, eos = self.script[r][self.turn[r]]
            self.turn[r] += 1
            ids = self.tok.encode(text, add_special_tokens=False) + ([self.tok.eos_token_id] if eos else [])
            ids = ids[: settings.max_new_tokens]
            rows_ids.append(ids)
            rows_lp.append([-0.5] * len(ids))
            cut.append(not eos and not any(text.endswith(s) for s in settings.stop))
        self.calls.append((len(prompts), settings))
        return to_rollout(prompts, 1, rows_ids, rows_lp, cut, self.tok, None)

    def start(self):
        self.turn = [0] * len(self.script)
        return self


class Renderer:
    """The plain protocol in miniature: <calc>EXPR</calc> calls, <result>...</result> replies."""

    stop_strings = ("</calc>",)

    def opening(self, messages):
        return TOK.encode(messages[0]["content"])

    def parse(self, text):
        return [ToolCall("calc", {"expression": e}) for e in re.findall(r"<calc>(.*?)</calc>", text)]

    def reply_tokens(self, messages, ended_with_eos):
        return TOK.encode("".join(f"<result>{m['content']}</result>" for m in messages))

    def final_answer(self, text):
        return re.sub(r"<calc>.*?</calc>", "", text).strip()


class Fault:
    def __init__(self, kind):
        self.kind = kind


class Host:
    def __init__(self, fault_on_call=False):
        self.examples, self.fault_on_call, self.faults = {}, fault_on_call, {}

    def reset(self, i, example):
        self.examples[i] = example
        return [{"role": "user", "content": example["prompt"]}]

    def call(self, i, call):
        if self.fault_on_call:
            return Fault("raised")
        a, b = call.arguments["expression"].split("*")
        return {"role": "tool", "name": "calc", "content": str(int(a) * int(b))}

    def step(self, i, text):
        return Step([], float(text == self.examples[i]["answer"]), True)

    def finish(self, i):
        return None


POLICY = SimpleNamespace(tokenizer=TOK, eos_ids=[EOS], max_seq_len=128, device=torch.device("cpu"))
EXAMPLE = {"prompt": "12*34=", "answer": "408"}


def run(script, host=None, **kw):
    opts = dict(group_size=1, max_turns=4, max_tokens=64, turn_tokens=24)
    opts.update(kw)
    engine = ScriptedEngine(script).start()
    return run_episodes(POLICY, host or Host(), Renderer(), [EXAMPLE] * len(script), engine=engine, **opts)


def test_two_turn_episode_layout_masks_and_logps():
    """Turn 1 '<calc>12*34</calc>' (18 tokens, cut by the stop string), the reply '<result>408</result>' (20
    tokens, the environment's), turn 2 '408' + EOS (4 tokens): 42 tokens after the 6-token opening, the action
    mask 1 on 18 + 4 of them, the sampler's log-probs (-0.5) there and 0 on the reply; reward 1 (right answer)."""
    eps = run([[("<calc>12*34</calc>", False), ("408", True)]])
    ep = eps.episodes[0]
    turn1, reply, turn2 = TOK.encode("<calc>12*34</calc>"), TOK.encode("<result>408</result>"), TOK.encode("408")
    assert (len(turn1), len(reply), len(turn2)) == (18, 20, 3)
    assert ep.tokens == turn1 + reply + turn2 + [EOS]
    assert ep.action == [1] * 18 + [0] * 20 + [1] * 4
    assert ep.logps == [-0.5] * 18 + [0.0] * 20 + [-0.5] * 4
    assert (ep.turns, ep.tool_calls, ep.end, ep.reward) == (2, 1, "done", 1.0)
    b = eps.batch
    assert b.prompt_ids.tolist() == [TOK.encode("12*34=")]
    assert b.response_mask.sum().item() == 42 and b.action_mask.sum().item() == 22
    assert b.texts == ["<calc>12*34</calc>«env: <result>408</result>»408"] and not b.truncated.item()
    # the update batch: every token attended to, the loss mask on the model's tokens only
    u = pack_rows([(b, 0)], TOK.pad_token_id)
    assert u.attn.sum().item() == 6 + 42
    assert u.resp_mask[0].tolist() == ep.action and u.old_logps[0].tolist() == ep.logps


def test_episode_ends_budget_fault_and_turn_limit():
    """The budget: 30 tokens cannot hold turn 1 (18) + the reply (20), so turn 2 has no room: 'budget', truncated.
    A tool that faults ends the episode with no reward. Four turns without an answer: 'max_turns'."""
    short = run([[("<calc>12*34</calc>", False), ("408", True)]], max_tokens=30)
    assert short.episodes[0].end == "budget" and short.batch.truncated.item()
    assert short.episodes[0].reward is None
    fault = run([[("<calc>12*34</calc>", False), ("408", True)]], host=Host(fault_on_call=True))
    assert fault.episodes[0].end == "fault" and fault.episodes[0].reward is None
    loop = run([[("<calc>1*1</calc>", False)] * 4], max_tokens=200)
    assert loop.episodes[0].end == "max_turns" and loop.episodes[0].turns == 4
    assert loop.metrics["episodes/end_max_turns"] == 1.0 and loop.metrics["episodes/tool_calls"] == 4.0


def test_rows_at_different_turns_are_batched_together():
    """Two episodes: one answers at once, one calls the tool first; the second turn samples only the live row."""
    eps = run([[("408", True)], [("<calc>12*34</calc>", False), ("408", True)]])
    assert [e.turns for e in eps.episodes] == [1, 2] and [e.reward for e in eps.episodes] == [1.0, 1.0]
    assert eps.batch.action_mask[0].sum().item() == 4 and eps.batch.response_mask[0].sum().item() == 4


def test_environment_tokens_carry_no_gradient():
    """The policy loss on an episode's update batch: the gradient with respect to the log-probs is 0 at every
    environment token and not at the model's."""
    from mirl.logps import response_logps
    from mirl.losses.policy import PolicyLoss
    from mirl.models import load_policy

    policy = load_policy("gpt-nano", max_seq_len=128, seed=0)
    eps = run([[("<calc>12*34</calc>", False), ("408", True)]])
    u = pack_rows([(eps.batch, 0)], TOK.pad_token_id)
    lp, _ = response_logps(policy, u.ids, u.attn, u.n_resp, 1.0)
    lp.retain_grad()
    loss, _ = PolicyLoss()(lp, lp.detach(), torch.tensor([1.0]), u.resp_mask)
    loss.backward()
    grad = lp.grad[0]
    env = u.resp_mask[0] == 0
    assert env.sum().item() == 20
    assert torch.all(grad[env] == 0) and torch.all(grad[~env] != 0)


# ---- the KV cache kept across turns (rollout/turns.py) -----------------------------------------------------------


class StepHost:
    """No tools: every model turn goes to step(); episode i is done after 1 + i % 3 turns (rows leave the batch
    at different turns), and its replies have 1 to 3 words (rows feed different numbers of new tokens)."""

    def __init__(self):
        self.turns = {}

    def reset(self, i, example):
        self.turns[i] = 0
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, i, text):
        self.turns[i] += 1
        done = self.turns[i] >= 1 + i % 3
        return Step([{"role": "user", "content": " ".join(["ok"] * (1 + (i + self.turns[i]) % 3))}], 1.0, done)

    def finish(self, i):
        return None


class TextRenderer:
    """The policy's own tokenizer, no tool calls; stop strings that end a random model's turn after a few tokens."""

    def __init__(self, tok, stops):
        self.tok, self.stop_strings = tok, stops

    def opening(self, messages):
        return self.tok.encode(messages[0]["content"], add_special_tokens=True)

    def parse(self, text):
        return []

    def reply_tokens(self, messages, ended_with_eos):
        return self.tok.encode(" ".join(m["content"] for m in messages), add_special_tokens=False)

    def final_answer(self, text):
        return text


def _cache_policy(kind, hf_tiny_dir):
    """A random tiny GPT or transformers Qwen2, and stop strings that end about one token in eight."""
    from mirl.models import load_policy

    if kind == "tiny":
        return load_policy("gpt-nano", max_seq_len=256, seed=0), tuple("0123456789aeiou")
    return load_policy(hf_tiny_dir), tuple("0123456789")


def _cache_run(policy, stops, engine, seed=3):
    from mirl.rollout.sample import row_seeds

    examples = [{"prompt": f"{i}*{10**i + 3}="} for i in range(4)]  # openings of different lengths
    seeds = row_seeds(seed, 0, list(range(4)), 2)
    return run_episodes(policy, StepHost(), TextRenderer(policy.tokenizer, stops), examples, group_size=2,
                        max_turns=3, max_tokens=60, turn_tokens=16, seeds=seeds, engine=engine)  # fmt: skip


class _NoCacheEngine:
    """The local sampler without conversation(): every turn re-prefills each row's whole context."""

    def __init__(self, policy):
        from mirl.rollout.engine import LocalEngine

        self.generate = LocalEngine(policy).generate


class _DynamicCacheEngine:
    """Conversations on the backend's own cache (the tiny GPT's list of tensors, transformers' DynamicCache)."""

    def __init__(self, policy):
        self.policy = policy

    def conversation(self, openings, room):
        from mirl.rollout.turns import Conversation

        return Conversation(self.policy, openings, room, static=False)


def _reply_lengths(ep):
    """The lengths of an episode's environment replies (the runs of action 0), in order."""
    runs, n = [], 0
    for a in ep.action + [1]:
        if a == 0:
            n += 1
        elif n:
            runs, n = runs + [n], 0
    return runs


@pytest.mark.parametrize("kind", ["tiny", "hf"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_kv_cache_reuse_equals_reprefilling(kind, cache, hf_tiny_dir):
    """8 episodes of up to 3 turns with per-row seeds, rows leaving at different turns and feeding replies of
    different lengths (holes in the fed block): keeping each row's KV cache across turns gives the very tokens,
    action masks and ends of re-prefilling the whole context every turn, and the log-probs to 1e-5."""
    from mirl.rollout.engine import LocalEngine

    policy, stops = _cache_policy(kind, hf_tiny_dir)
    reuse_engine = LocalEngine(policy) if cache == "static" else _DynamicCacheEngine(policy)
    reuse, plain = _cache_run(policy, stops, reuse_engine), _cache_run(policy, stops, _NoCacheEngine(policy))
    turns = [ep.turns for ep in reuse.episodes]
    assert len(set(turns)) == 3, turns  # rows ended after 1, 2 and 3 turns
    assert len({n for ep in reuse.episodes for n in _reply_lengths(ep)}) > 1  # replies of different lengths
    for a, b in zip(reuse.episodes, plain.episodes):
        assert (a.tokens, a.action, a.turns, a.end) == (b.tokens, b.action, b.turns, b.end)
        torch.testing.assert_close(torch.tensor(a.logps), torch.tensor(b.logps), atol=1e-5, rtol=0)


def _forward_shapes(policy, run):
    """run() with every policy.step's input shape (rows, tokens) recorded -> (its result, the shapes)."""
    shapes, step = [], policy.step

    def counted(input_ids, *a, **k):
        shapes.append(tuple(input_ids.shape))
        return step(input_ids, *a, **k)

    policy.step = counted
    try:
        return run(), shapes
    finally:
        del policy.step


@pytest.mark.parametrize("kind", ["tiny", "hf"])
def test_kv_cache_reuse_prefills_only_the_new_tokens(kind, hf_tiny_dir):
    """The forwards of the reuse path: the openings' prefill (widest opening), one token per row per decoding
    step, and before each later turn one block of 1 + the longest reply among the rows going on (each row's last
    sampled token and the environment's reply), never the history that re-prefilling feeds."""
    from mirl.rollout.engine import LocalEngine

    policy, stops = _cache_policy(kind, hf_tiny_dir)
    eps, reuse = _forward_shapes(policy, lambda: _cache_run(policy, stops, LocalEngine(policy)))
    _, plain = _forward_shapes(policy, lambda: _cache_run(policy, stops, _NoCacheEngine(policy)))
    opening = max(len(ep.opening) for ep in eps.episodes)
    replies = [_reply_lengths(ep) for ep in eps.episodes]
    fed = [1 + max(r[k - 2] for r, ep in zip(replies, eps.episodes) if ep.turns >= k) for k in (2, 3)]
    wide = [w for _, w in reuse if w > 1]
    assert wide == [opening, *fed], (wide, fed)
    history = [w for _, w in plain if w > 1]  # re-prefilling: the widest whole context of each turn
    assert len(history) == 3 and all(f < h for f, h in zip(fed, history[1:])), (fed, history)


def test_conversation_grows_its_static_cache_and_takes_empty_replies():
    """A Conversation sized for 2 more tokens: its static cache grows before the turns that do not fit; a row
    whose environment adds nothing (it feeds only its last token) and rows leaving the batch still give the tokens
    and log-probs of Reprefill on the local engine."""
    from mirl.models import load_policy
    from mirl.models.decode import StaticCache
    from mirl.rollout.engine import LocalEngine, SamplingSettings
    from mirl.rollout.sample import row_seeds
    from mirl.rollout.turns import Conversation, Reprefill

    policy = load_policy("gpt-nano", max_seq_len=256, seed=0)
    openings = [TOK.encode(p) for p in ("1+2=", "30*4=", "5", "66-7=")]
    settings = SamplingSettings(8, stop=tuple("0123456789"))
    talks = [Conversation(policy, openings, room=2), Reprefill(LocalEngine(policy), openings)]
    slots = talks[0].cache.mask.shape[1]
    rows, replies = [0, 1, 2, 3], {0: TOK.encode("ok"), 1: [], 2: TOK.encode("fine, go on"), 3: TOK.encode("no")}
    for turn in range(3):
        seeds = row_seeds(1, turn, rows, 1)
        a, b = (talk.turn(rows, settings, seeds=seeds) for talk in talks)
        assert a.ids == b.ids and a.cut == b.cut
        for x, y in zip(a.logps, b.logps):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)
        rows = rows[: 3 - turn]  # the last row leaves after each turn
        for talk in talks:
            for i in rows:
                talk.extend(i, replies[i])
    assert isinstance(talks[0].cache, StaticCache) and talks[0].cache.mask.shape[1] > slots


def test_a_reply_that_would_overflow_the_context_ends_the_episode():
    """Context 40: the 6-token opening and the 18-token call leave no room for the 20-token reply and a turn after
    it, so the episode ends ('budget') without it: no row ever exceeds the model's context (the update's forward
    takes the whole row). After the last allowed turn no reply is added either (nobody reads it)."""
    small = SimpleNamespace(tokenizer=TOK, eos_ids=[EOS], max_seq_len=40, device=torch.device("cpu"))
    engine = ScriptedEngine([[("<calc>12*34</calc>", False), ("408", True)]]).start()
    eps = run_episodes(small, Host(), Renderer(), [EXAMPLE], group_size=1, max_turns=4, max_tokens=64, turn_tokens=24,
                       engine=engine)  # fmt: skip
    ep = eps.episodes[0]
    assert (
        ep.end == "budget" and len(ep.opening) + len(ep.tokens) <= 40 and ep.tokens == TOK.encode("<calc>12*34</calc>")
    )
    last = run([[("<calc>12*34</calc>", False)]], max_turns=1)
    assert last.episodes[0].end == "max_turns" and all(last.episodes[0].action)
