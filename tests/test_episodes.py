"""Multi-turn episodes (rollout/episodes.py) with a scripted engine and environment: the token layout, the
masks and log-probs of a two-turn episode derived by hand, the ends (budget, fault, turn limit), and that the
environment's tokens carry no gradient through the policy loss."""

import re
from types import SimpleNamespace

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

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, n, settings, *, generator=None, seeds=None, **_):
        live = [r for r in range(len(self.script)) if self.turn[r] < len(self.script[r])][: len(prompts)]
        rows_ids, rows_lp, cut = [], [], []
        for r in live:
            text, eos = self.script[r][self.turn[r]]
            self.turn[r] += 1
            ids = TOK.encode(text) + ([EOS] if eos else [])
            ids = ids[: settings.max_new_tokens]
            rows_ids.append(ids)
            rows_lp.append([-0.5] * len(ids))
            cut.append(not eos and not any(text.endswith(s) for s in settings.stop))
        self.calls.append((len(prompts), settings))
        return to_rollout(prompts, 1, rows_ids, rows_lp, cut, TOK, None)

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
    assert b.texts == ["<calc>12*34</calc><result>408</result>408"] and not b.truncated.item()
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
