"""The start and the end every RL recipe shares (grpo, ppo, online, distill), once the policy, its prompts and
rewards are loaded: the optimizer, the sampling generator, the resume, the held-out evaluation before training,
FSDP2, the sampling engine, the learning-rate schedule, the Run and its checkpoint writer (start_loop); one
step's rollout of this rank's prompts (sample_step); and at the end the engine closed, the weights gathered, the
final evaluation and final/ (finish_loop). A recipe's own state (KL and entropy coefficients, the prompt
sampler's pass rates) comes as objects with state() and load(), saved with every checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .. import distributed as dist
from ..checkpoint import save_checkpoint
from ..data.collate import batch_indices
from ..device import phase
from ..optim import Schedule, make_optimizer
from ..rollout.engine import Engine, make_engine
from ..rollout.sample import row_seeds
from ..rollout.score import ScoredBatch, rollout_and_score
from .common import gathered_policy
from .held_out import held_out_evaluator
from .run import Run, end_of_run, open_run, resume_state


@dataclass
class Loop:
    """What an RL recipe's loop uses: from start_loop."""

    run: Run
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the sampling noise (its state is saved with checkpoints)
    schedule: Schedule
    engine: Engine
    evaluate: Callable | None  # evaluate(step) -> held-out accuracy (None: no held-out set)
    save: Callable[[int], None]  # save(step): the checkpoint (rank 0)
    seeded: bool  # per-row sampling noise: the same samples whatever the rank layout


@dataclass(frozen=True)
class Passes:
    """How an RL update goes over a batch, built once in the recipe's derived values: `passes` passes (grpo's
    num_iterations, ppo's epochs), each a permutation of the global batch in `minibatches` optimizer steps, the
    update's forwards at `temperature` (under bf16 autocast with bf16)."""

    passes: int
    minibatches: int
    seed: int
    stride: int  # pass p over step s is permuted with seed + stride * s + p
    temperature: float = 1.0
    bf16: bool = False

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps per batch."""
        return self.passes * self.minibatches

    def __call__(self, n: int, step: int, device):
        """-> (pass, the optimizer step's index over the run, this rank's minibatch rows, the rows to forward) for
        each optimizer step over a batch of n rows at `step`: the same permutation under torchrun as in one
        process. A rank whose part is empty forwards one row (weight 0) so that its collectives meet the others'."""
        for p in range(self.passes):
            for j, mb in enumerate(dist.minibatches(n, self.minibatches, self.seed + self.stride * step + p, device)):
                fwd = mb if len(mb) else torch.arange(1, device=mb.device)
                yield p, (step * self.passes + p) * self.minibatches + j, mb, fwd


def start_loop(
    cfg,
    policy,
    task,
    test: list,
    *,
    desc: str,
    show: tuple[str, ...],
    before: str,
    optimizer_steps: int,
    trained=None,
    keep: tuple = (),
    write_extra=None,
    engine: str = "local",
    vllm_memory: float = 0.3,
    row_seeded: bool = False,
) -> Loop:
    """The RL setup tail. cfg is read for the options every recipe has (out_dir, resume, seed, lr, weight_decay,
    the schedule's, the cadence's, fsdp, max_new_tokens); the rest comes as arguments: the held-out label
    `before` training, the schedule's length in optimizer steps, the module the optimizer trains (`trained`,
    default the policy), the recipe's state objects (`keep`: each with state() -> a dict merged into the
    checkpoint's, and load(that dict)), write_extra(folder) for more checkpoint files, the engine and per-row
    sampling noise."""
    trained = trained if trained is not None else policy
    optimizer = make_optimizer(trained, cfg.lr, cfg.weight_decay)
    gen = torch.Generator(device=policy.device).manual_seed(cfg.seed)
    start, evals = 0, []
    if cfg.resume:
        saved = {k: v for obj in keep for k, v in obj.state().items()}  # the keys to read, at their start values
        start, evals = resume_state(cfg.out_dir, policy, optimizer, gen, saved)
        for obj in keep:
            obj.load(saved)
    elif dist.is_main() and test:
        held_out_evaluator(policy, task, test, run=None, evals=evals, max_new_tokens=cfg.max_new_tokens)(0, before)
    if cfg.fsdp and dist.world_size() > 1:  # FSDP2 after the evaluation before training (rank 0 alone runs it)
        dist.wrap(policy, fsdp=True)
        optimizer = make_optimizer(trained, cfg.lr, cfg.weight_decay)
    engine_ = make_engine(engine, policy, out_dir=cfg.out_dir, memory=vllm_memory, seed=cfg.seed)
    schedule = Schedule(cfg.lr, cfg.warmup_steps, optimizer_steps, cfg.min_lr_ratio, cfg.max_grad_norm)
    run = open_run(cfg, desc=desc, show=show, start=start, evals=evals)

    def save(step: int) -> None:
        state = {"gen_rng": gen.get_state().tolist(), "evals": run.evals}
        for obj in keep:
            state.update(obj.state())
        save_checkpoint(cfg.out_dir, policy, optimizer, step, state, write_extra=write_extra)

    evaluate = held_out_evaluator(policy, task, test, run=run, max_new_tokens=cfg.max_new_tokens)
    seeded = row_seeded or dist.world_size() > 1
    return Loop(run, optimizer, gen, schedule, engine_, evaluate, save, seeded)


def sample_step(
    loop: Loop,
    policy,
    data: list[dict],
    reward_set,
    step: int,
    *,
    prompts_per_step: int,
    seed: int,
    group_size: int,
    log_completions: int = 0,
    rollout=None,
    **sampling,
) -> tuple[ScoredBatch, list[int]]:
    """This rank's share of step `step`'s prompts (the same global batch on any rank layout), group_size
    responses each, sampled with `sampling` (max_new_tokens, temperature, ...) and scored; counted in the run and
    logged (log_completions of them). rollout: what samples and scores (default rollout_and_score; episodes in an
    environment: envs/task.EnvTask.rollout). -> (the scored rollout, this rank's positions in the global batch)."""
    idx = batch_indices(len(data), prompts_per_step, step, seed)
    mine = dist.shard(list(range(len(idx))))
    seeds = row_seeds(seed, step, mine, group_size) if loop.seeded else None
    shape = (prompts_per_step * group_size, sampling["max_new_tokens"])
    with phase("rollout", step + 1, shape):
        sb = (rollout or rollout_and_score)(
            policy,
            [data[idx[i]] for i in mine],
            reward_set,
            group_size=group_size,
            generator=loop.generator,
            seeds=seeds,
            engine=loop.engine,
            **sampling,
        )
    loop.run.count_samples(sb)
    loop.run.log_completions(step + 1, sb, reward_set.names, log_completions)
    return sb, mine


def finish_loop(loop: Loop, cfg, policy, task, test: list, data: list, *, after: str, extra_save=None):
    """The end of an RL run: the engine closed, the weights gathered (FSDP2), final/ saved and evaluated (label
    `after`), evals.json and the report. -> (the policy to return, the summary with the config)."""
    loop.engine.close()
    policy = gathered_policy(policy, cfg)
    final_eval = held_out_evaluator(policy, task, test, run=loop.run, max_new_tokens=cfg.max_new_tokens)
    summary = end_of_run(
        loop.run,
        policy,
        merged=not cfg.save_adapter_only,
        extra_save=extra_save,
        report=cfg.report,
        task=task,
        examples=test or data,
        max_new_tokens=cfg.max_new_tokens,
        evaluate=final_eval and (lambda: final_eval(loop.run.steps, after)),
    )
    summary["config"] = asdict(cfg)
    return policy, summary
