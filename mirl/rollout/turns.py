"""The engine's side of multi-turn episodes (rollout/episodes.py): one model turn per call for the episodes still
going, and the environment's tokens appended in between.

    talk = start_conversation(engine, openings, room=...)         # Conversation (LocalEngine) or Reprefill
    turn = talk.turn(rows, settings, generator=g, seeds=s)       # Turn: per row, its tokens, log-probs, cut
    talk.extend(row, reply_ids)                                  # before that row's next turn

Conversation (mirl's own sampler, LocalEngine.conversation) keeps the rows' KV cache across turns: the openings
are prefilled once; a turn decodes from the cache (rollout/sample.py: decode_tokens, which leaves each row's last
token out of the cache), and the next one first feeds each row's new tokens (that last token and the
environment's reply) in one forward of only those tokens, right-aligned in a block: a row with fewer new tokens
has holes (mask 0) at the block's start, as a left-padded prompt has. Positions are the mask count in both
backends (models/backends.py: positions_from_mask; models/decode.py: _advance), so holes change no position and
no attention. Rows whose episode ended are cut out of the cache; a cache that cannot be cut (a transformers
cache type without batch_select_indices) is rebuilt from the live rows' whole contexts, i.e. a re-prefill. A
static cache (models/decode.py) grows when a turn does not fit in it (the holes take slots too).

Reprefill (any other engine: vLLM, whose prefix cache makes it cheap) sends each row's whole context every turn.

The two give the same tokens with per-row seeds (row_gumbel: the noise depends on the row's seed and the step
only) and the same log-probs to float rounding (tests/test_episodes.py: tiny GPT and a transformers Qwen2, static
and dynamic caches). With the shared generator a turn draws the same numbers (one uniform per row and step, the
rows in the same order), so the streams agree too, except where a float difference in the logits moves a token
across its cumulative-probability boundary: a different but equally valid sample, and the streams diverge from
there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from ..models.decode import StaticCache
from .sample import RolloutBatch, decode_tokens, left_pad


class Turn(NamedTuple):
    """One model turn of each row asked for, on the host."""

    ids: list[list[int]]  # the tokens (EOS or the stop string's end included)
    logps: list[list[float]]  # the sampler's log-prob of each
    cut: list[bool]  # hit max_new_tokens without EOS or a stop string


def as_turn(batch: RolloutBatch) -> Turn:
    """One-sample-per-prompt RolloutBatch -> Turn."""
    n = batch.response_mask.sum(1).tolist()
    ids, lps = batch.response_ids.tolist(), batch.logps.tolist()
    return Turn([r[:k] for r, k in zip(ids, n)], [r[:k] for r, k in zip(lps, n)], batch.truncated.tolist())


def start_conversation(engine, openings: list[list[int]], room: int, images: list | None = None):
    """The engine's Conversation when it has one (engine.conversation -> None: it cannot keep caches now), else a
    Reprefill. room: the most tokens a row's context can gain after its opening (sizes a static cache). images:
    per row, the image inputs of its opening (episodes of an image+text model: always a Reprefill, which sends
    each row's images with its context; tools may add images to a row later)."""
    make = getattr(engine, "conversation", None)
    if images is not None:
        return Reprefill(engine, openings, images)
    return (make(openings, room) if make is not None else None) or Reprefill(engine, openings)


class Reprefill:
    """Each turn sends every asked row's whole context to engine.generate as its prompt."""

    def __init__(self, engine, openings: list[list[int]], images: list | None = None):
        self.engine, self.contexts = engine, [list(o) for o in openings]
        self.images = None if images is None else [[x] if x else [] for x in images]  # per row, in context order

    def turn(self, rows: list[int], settings, *, generator=None, seeds=None) -> Turn:
        """One turn of each row in `rows` (episode indices) -> Turn (in the order of rows)."""
        from ..models.vision import cat_images

        prompts = [self.contexts[i] for i in rows]
        images = None if self.images is None else [cat_images(self.images[i]) for i in rows]
        if images is not None and getattr(self.engine, "needs_raw_images", False):
            from ..options import ConfigError

            raise ConfigError("episodes with images sample with mirl's own engine for now: use --engine local")
        out = self.engine.generate(prompts, 1, settings, generator=generator, seeds=seeds, images=images)
        turn = as_turn(out)
        for i, ids in zip(rows, turn.ids):
            self.contexts[i] += ids
        return turn

    def extend(self, row: int, tokens: list[int], images: dict | None = None) -> None:
        """Tokens the environment wrote into row's context (and the image inputs of their image tokens)."""
        self.contexts[row] += tokens
        if images is not None:
            self.images[row].append(images)


@contextmanager
def _eval(policy):
    was = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        policy.train(was)


class Conversation:
    """Episodes' KV caches kept across turns on mirl's sampler (the module docstring says how)."""

    def __init__(self, policy, openings: list[list[int]], room: int, static: bool = True):
        self.policy, self.static = policy, static
        self.contexts = [list(o) for o in openings]
        self.room = room
        self._prefill(list(range(len(openings))))

    def _prefill(self, rows: list[int]) -> None:
        """The rows' whole contexts through the model: the cache, and the logits their next turn starts from."""
        ids, mask = left_pad([self.contexts[i] for i in rows], self.policy.tokenizer.pad_token_id)
        ids, mask = ids.to(self.policy.device), mask.to(self.policy.device)
        room = max(1, min(self.room, self.policy.max_seq_len - ids.shape[1]))
        with _eval(self.policy):
            logits, self.cache = self.policy.start_decode(ids, mask, room, static=self.static)
        self.rows, self.attn, self.logits = list(rows), mask, logits[:, -1:]  # (B, 1, V)
        self.pending: dict[int, list[int]] = {i: [] for i in rows}  # context tokens not in the cache yet

    def _keep(self, rows: list[int]) -> None:
        """Cut the rows not asked for out of the cache (their episodes ended)."""
        if rows == self.rows:
            return
        where = {r: k for k, r in enumerate(self.rows)}
        idx = torch.tensor([where[i] for i in rows], device=self.attn.device)
        cut = self.policy.select_rows(self.cache, idx)
        if cut is None:  # this cache cannot be cut: prefill the live rows' whole contexts again
            self._prefill(rows)
            return
        self.rows, self.cache, self.attn, self.logits = list(rows), cut, self.attn[idx], self.logits[idx]

    def _fit(self, tokens: int) -> None:
        """A static cache grows to hold `tokens` more (its holes take slots too); any other cache grows itself."""
        if isinstance(self.cache, StaticCache):
            short = self.attn.shape[1] + tokens - self.cache.mask.shape[1]
            if short > 0:
                self.cache = self.cache.grown(short)

    def _feed(self, new: list[list[int]]) -> None:
        """Each row's new tokens through the model in one forward, right-aligned (a shorter row has holes first)."""
        block, bits = left_pad(new, self.policy.tokenizer.pad_token_id)
        attn = torch.cat([self.attn, bits.to(self.attn.device)], 1)
        with _eval(self.policy):
            logits, self.cache = self.policy.step(block.to(self.attn.device), attn, self.cache)
        self.attn, self.logits = attn, logits[:, -1:]
        self.pending = {i: [] for i in self.rows}

    def turn(self, rows: list[int], settings, *, generator=None, seeds=None) -> Turn:
        """One turn of each row in `rows` (episode indices, ascending, all still in the conversation): the
        environment's tokens since their last turn are fed first -> Turn (in the order of rows)."""
        self._keep(rows)
        new = [self.pending[i] for i in self.rows]
        self._fit(max(map(len, new)) + settings.max_new_tokens)
        if any(new):  # every row after its first turn (at least its last token)
            self._feed(new)
        with _eval(self.policy):  # drop_finished=False: a row that ends its turn stays in the cache (it goes on)
            out = decode_tokens(
                self.policy,
                self.logits,
                self.cache,
                self.attn,
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                stop_strings=settings.stop,
                ignore_eos=settings.ignore_eos,
                generator=generator,
                seeds=seeds,
                drop_finished=False,
            )
        self.cache, self.attn = out.cache, out.attn
        n, ids, lps = out.lengths.tolist(), out.ids.tolist(), out.logps.tolist()
        turn = Turn([r[:k] for r, k in zip(ids, n)], [r[:k] for r, k in zip(lps, n)], (~out.stopped).tolist())
        for i, tokens in zip(rows, turn.ids):
            self.contexts[i] += tokens
            self.pending[i] = tokens[-1:]  # decode_tokens leaves a row's last token out of the cache
        return turn

    def extend(self, row: int, tokens: list[int]) -> None:
        """Tokens the environment wrote into row's context: fed with the row's next turn."""
        self.contexts[row] += tokens
        self.pending[row] = self.pending.get(row, []) + list(tokens)
