"""Multi-turn episodes: the model and an environment take turns until the environment ends the episode, the
turn limit or the token budget.

Per turn, every live episode's whole context (the opening, then each model turn and each environment reply)
goes to the engine as one prompt, and the model writes one turn: until EOS, or a stop string that closes a tool
call (envs/protocol.py). A turn that calls tools gets the tools' results (run by the EnvHost, envs/host.py);
a turn without a call goes to the environment's step(), whose Step may end the episode and carry a reward.
The environment's tokens stay in the context but out of the loss: RolloutBatch.action_mask is 1 on the
model's tokens only, and their sampler log-probs are the only ones recorded.

    episodes = run_episodes(policy, host, renderer, examples, group_size=G, max_turns=4, max_tokens=96, ...)
    episodes.batch: a RolloutBatch (prompt = the opening, response = everything after it, action_mask)

Ends, counted in the metrics: the environment's done; --max-turns and the token budget (max_tokens after the
opening, or the model's context; the episode is marked truncated), after which the environment's finish(), if
it has one, may give the reward (the built-ins give 0: no answer); a fault (a tool or step that raised, hung
or answered badly: reward None).
The engine's side is a conversation (rollout/turns.py): mirl's own sampler keeps each episode's KV cache across
turns and prefills only the new tokens (the environment's reply); any other engine (vLLM) gets each live
episode's whole context every turn, which its prefix cache makes cheap. With per-row seeds both give the same
episodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .engine import SamplingSettings
from .sample import RolloutBatch, left_pad
from .turns import start_conversation


@dataclass
class Episode:
    """One episode's record, built turn by turn on the host."""

    opening: list[int]
    tokens: list[int] = field(default_factory=list)  # everything after the opening
    action: list[int] = field(default_factory=list)  # 1 on the model's tokens
    logps: list[float] = field(default_factory=list)  # the sampler's, 0 on the environment's tokens
    turns: int = 0
    tool_calls: int = 0
    bad_calls: int = 0
    rewards: list[float] = field(default_factory=list)
    done: bool = False
    end: str = ""  # done | max_turns | budget | fault
    last_turn: str = ""  # the text of the model's last turn
    images: list = field(default_factory=list)  # image inputs of the context's images, in order (image+text models)

    def add(self, ids: list[int], logps: list[float] | None) -> None:
        """Append tokens: the model's (with their log-probs) or the environment's (logps None)."""
        self.tokens += ids
        self.action += [1 if logps is not None else 0] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)

    @property
    def length(self) -> int:
        """Tokens in the episode's context so far."""
        return len(self.opening) + len(self.tokens)

    @property
    def reward(self) -> float | None:
        """The sum of the environment's rewards (None: it gave none, or the episode faulted)."""
        return None if self.end == "fault" or not self.rewards else sum(self.rewards)


@dataclass
class Episodes:
    """What run_episodes returns."""

    batch: RolloutBatch
    episodes: list[Episode]
    metrics: dict


def turn_seeds(seeds: torch.Tensor | None, turn: int) -> torch.Tensor | None:
    """Per-row sampling seeds for turn `turn` (another stream per turn from each row's episode seed)."""
    if seeds is None:
        return None
    return (seeds * 1000003 + turn * 7919) & 0x7FFFFFFF


def run_episodes(
    policy,
    host,
    renderer,
    examples: list[dict],
    *,
    group_size: int,
    max_turns: int,
    max_tokens: int,
    turn_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
    engine=None,
) -> Episodes:
    """group_size episodes per example, at most max_turns model turns of at most turn_tokens tokens each and
    max_tokens tokens after the opening in all. host: the EnvHost of len(examples) x group_size episodes
    (row i is episode i); renderer: envs/protocol.Renderer of the model's tokenizer and the tools."""
    from .engine import LocalEngine

    engine = engine or LocalEngine(policy)
    tok = policy.tokenizer
    eos = set(getattr(policy, "eos_ids", None) or [tok.eos_token_id])
    rows = [e for e in examples for _ in range(group_size)]
    eps, opening_images = [], []
    for i, e in enumerate(rows):  # a reset that faults: the episode ends before its first turn
        opening = host.reset(i, e)
        fault = is_fault(opening)
        messages = [{"role": "user", "content": e["prompt"]}] if fault else opening
        ids, images = encode_messages(policy, renderer, messages)
        eps.append(Episode(ids, images=[images] if images else []))
        opening_images.append(images)
        if fault:
            eps[-1].done, eps[-1].end = True, "fault"
    context = policy.max_seq_len
    # a row's context grows by at most max_tokens, plus a turn that the budget then cuts; an image+text model's
    # episodes send their images with every turn (rollout/turns.py: Reprefill)
    talk = start_conversation(engine, [ep.opening for ep in eps], room=max_tokens + turn_tokens,
                              images=opening_images if getattr(policy, "is_vlm", False) else None)  # fmt: skip
    for turn in range(max_turns):
        live = [i for i, ep in enumerate(eps) if not ep.done]
        if not live:
            break
        room = {i: min(turn_tokens, max_tokens - len(eps[i].tokens), context - eps[i].length) for i in live}
        for i in [i for i in live if room[i] <= 0]:
            eps[i].done, eps[i].end = True, "budget"
        live = [i for i in live if room[i] > 0]
        if not live:
            break
        widest = max(eps[i].length for i in live)
        settings = SamplingSettings(
            min(max(room[i] for i in live), context - widest), temperature, top_p, top_k, stop=renderer.stop_strings
        )
        if settings.max_new_tokens <= 0:  # the longest context is full: those rows end, the others go on
            for i in live:
                eps[i].done, eps[i].end = True, "budget"
            break
        row_seeds = None if seeds is None else turn_seeds(seeds[live], turn)
        out = talk.turn(live, settings, generator=generator, seeds=row_seeds)
        for j, i in enumerate(live):
            ids, ep = out.ids[j], eps[i]
            n = min(len(ids), room[i])
            ep.add(ids[:n], out.logps[j][:n])
            ep.turns += 1
            ep.last_turn = tok.decode(ids[:n], skip_special_tokens=True)
            if n < len(ids) or out.cut[j]:  # the budget (or the turn's limit) cut the turn: the episode ends
                ep.done, ep.end = True, "budget"
                continue
            reply = take_turn(host, renderer, i, ep)
            if ep.done:
                continue
            if turn == max_turns - 1:  # no model turn follows: the reply would be read by nobody
                continue
            reply_ids, images = encode_messages(policy, renderer, reply, n > 0 and ids[n - 1] in eos)
            if len(ep.tokens) + len(reply_ids) >= max_tokens or ep.length + len(reply_ids) >= context:
                ep.done, ep.end = True, "budget"  # no room for another turn: the reply is not added
                continue
            ep.add(reply_ids, None)
            if images:
                ep.images.append(images)
                talk.extend(i, reply_ids, images)
            else:
                talk.extend(i, reply_ids)
    for i, ep in enumerate(eps):  # the turn limit or the budget ended it: the environment's last word
        if ep.end in ("", "budget"):
            ep.end = ep.end or "max_turns"
            r = host.finish(i)
            if r is not None and not is_fault(r):
                ep.rewards.append(float(r))
            ep.end = "fault" if is_fault(r) else ep.end
    return Episodes(to_rollout_batch(eps, rows, group_size, tok, policy.device), eps, episode_metrics(eps))


def encode_messages(policy, renderer, messages: list[dict], ended_with_eos: bool | None = None):
    """Messages -> (token ids, image inputs or None): the opening (ended_with_eos None) or a reply after a model
    turn, as the renderer writes them; a message's images become the model's image tokens, each in place of a
    placeholder '<image>' (put first in the message's text when it has none)."""
    from ..models.tokenizer import IMAGE_PLACEHOLDER

    images = [im for m in messages for im in m.get("images") or []]
    messages = [with_placeholders(m) for m in messages]
    opening = ended_with_eos is None
    ids = renderer.opening(messages) if opening else renderer.reply_tokens(messages, ended_with_eos)
    if not images:
        return ids, None
    text = renderer.opening_text(messages) if opening else renderer.reply_text(messages, ended_with_eos)
    if text.count(IMAGE_PLACEHOLDER) != len(images):
        raise ValueError(f"the environment's messages have {len(images)} image(s) but the rendered text places "
                         f"{text.count(IMAGE_PLACEHOLDER)}")  # fmt: skip
    full, inputs = policy.encode_prompt(text, images, "environment message")
    tok = policy.tokenizer
    body = full[len(tok.encode("", add_special_tokens=True)) :]  # without the BOS a prompt gets
    lead = ids[: len(ids) - len(tok.encode(text, add_special_tokens=False))]  # a plain opening's BOS, a reply's EOS
    return lead + body, inputs


def with_placeholders(message: dict) -> dict:
    """A message whose images have no '<image>' in its text gets them first (TRL's convention)."""
    from ..models.tokenizer import IMAGE_PLACEHOLDER

    n = len(message.get("images") or [])
    text = message.get("content") or ""
    if not n or (isinstance(text, str) and IMAGE_PLACEHOLDER in text):
        return message
    return {**message, "content": IMAGE_PLACEHOLDER * n + text}


def is_fault(x) -> bool:
    """Whether an EnvHost answer is a fault marker (envs/host.py: Fault)."""
    return type(x).__name__ == "Fault"


def take_turn(host, renderer, i: int, ep: Episode) -> list[dict]:
    """The environment's side of episode i's last model turn: its tool calls run (a malformed call is an
    observation the model sees), or the turn goes to step(); -> the reply messages (ep.done set when it ends)."""
    calls = renderer.parse(ep.last_turn)
    if calls:
        reply = []
        for call in calls:
            ep.tool_calls += 1
            ep.bad_calls += call.error is not None
            message = host.call(i, call)
            if is_fault(message):
                ep.done, ep.end = True, "fault"
                return []
            reply.append(message)
        return reply
    step = host.step(i, renderer.final_answer(ep.last_turn))
    if is_fault(step):
        ep.done, ep.end = True, "fault"
        return []
    if step.reward is not None:
        ep.rewards.append(float(step.reward))
    if step.done:
        ep.done, ep.end = True, "done"
    return step.messages


def to_rollout_batch(eps: list[Episode], rows: list[dict], group_size: int, tok, device) -> RolloutBatch:
    """Episodes -> a RolloutBatch: the openings left-padded as the prompts, everything after them right-padded
    as the responses (response_mask: every real token; action_mask: the model's), truncated = cut by the budget."""
    pad = tok.pad_token_id
    prompt_ids, prompt_mask = left_pad([ep.opening for ep in eps], pad)
    width = max(1, max(len(ep.tokens) for ep in eps))
    ids = torch.full((len(eps), width), pad, dtype=torch.long)
    mask, action, logps = (torch.zeros((len(eps), width), dtype=dt) for dt in (torch.long, torch.long, torch.float32))
    for k, ep in enumerate(eps):
        n = len(ep.tokens)
        ids[k, :n] = torch.tensor(ep.tokens, dtype=torch.long)
        mask[k, :n] = 1
        action[k, :n] = torch.tensor(ep.action, dtype=torch.long)
        logps[k, :n] = torch.tensor(ep.logps)
    from ..models.vision import cat_images

    texts = [transcript(ep, tok) for ep in eps]
    images = [cat_images(ep.images) for ep in eps]
    truncated = torch.tensor([ep.end == "budget" for ep in eps])
    index = torch.arange(len(rows) // group_size).repeat_interleave(group_size)
    on = lambda t: t.to(device)
    return RolloutBatch(on(prompt_ids), on(prompt_mask), on(ids), on(mask), on(logps), on(truncated), on(index), texts,
                        images if any(x is not None for x in images) else None, on(action))  # fmt: skip


def transcript(ep: Episode, tok) -> str:
    """The episode after its opening as text, the environment's parts marked: «env: ...» (samples, the report)."""
    parts, start = [], 0
    for k in range(1, len(ep.tokens) + 1):
        if k == len(ep.tokens) or ep.action[k] != ep.action[start]:
            text = tok.decode(ep.tokens[start:k], skip_special_tokens=True)
            parts.append(text if ep.action[start] else f"«env: {text.strip()}»")
            start = k
    return "".join(parts)


def episode_metrics(eps: list[Episode]) -> dict:
    """Means over the episodes: turns, tool calls, malformed calls; the fraction that ended each way."""
    n = max(1, len(eps))
    out = {
        "episodes/turns": sum(ep.turns for ep in eps) / n,
        "episodes/tool_calls": sum(ep.tool_calls for ep in eps) / n,
        "episodes/bad_calls": sum(ep.bad_calls for ep in eps) / n,
    }
    for end in ("done", "max_turns", "budget", "fault"):
        out[f"episodes/end_{end}"] = sum(ep.end == end for ep in eps) / n
    return out


def score_episodes(episodes: Episodes, examples: list[dict], group_size: int, reward_set, renderer, gen_s: float):
    """A ScoredBatch of episodes: the reward functions score each episode's final answer (the last model turn,
    tool markup removed), with the example's columns and `env_reward` (the environment's reward, None where it
    gave none: the `env` reward passes it on)."""
    import time

    from .score import ScoredBatch

    t0 = time.perf_counter()
    rows = [e for e in examples for _ in range(group_size)]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "where", "image_base")}
    columns.update(example=rows, env_reward=[ep.reward for ep in episodes.episodes])
    answers = [renderer.final_answer(ep.last_turn) for ep in episodes.episodes]
    batch = episodes.batch
    rewards, per_fn, metrics = reward_set.score([r["prompt"] for r in rows], answers, device=batch.prompt_ids.device,
                                                **columns)  # fmt: skip
    metrics.update(episodes.metrics)
    return ScoredBatch(batch, rows, rewards, per_fn, metrics, gen_s, time.perf_counter() - t0)
