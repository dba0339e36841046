"""Checking a command's whole configuration before any model is loaded: ranges and choices of every option.

An option with a fixed set of values declares them beside its field, `loss_agg: str = choice("grpo", "bnpo")`
(the first is the default; `among=` a registry's names), and so does a policy-loss term's own option
(`term_option`). What is shared stays here: one table of ranges keyed by option name (the same name means the
same thing in every recipe), the options that need another (NEEDS) and the combination checks.
`check_config(cfg)` walks the fields of a recipe's Config dataclass and raises a ConfigError naming the option
(as its flag), the value given and what is allowed. Options whose range depends on the recipe (beta,
temperature) have a per-recipe entry.
"""

from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
    """A bad option value or config file: the message names the option or the file."""


def _int_at_least(lo: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo), f"an integer >= {lo}"


def _float_in(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    what = (
        f"a finite number >{'' if lo_open else '='} {lo:g}"
        if hi == math.inf
        else f"a number in {left}{lo:g}, {hi:g}{right}"
    )
    return ok, what


def _finite():
    return (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)), "a finite number"


def _one_of(*choices: str):
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _comma_choices(*choices: str):
    def ok(v):
        parts = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else None
        return bool(parts) and all(x in choices for x in parts)

    return ok, "a comma-separated list of " + ", ".join(choices)


def choice(default: str, *others: str, among: tuple[str, ...] = ()):
    """A Config field whose value is one of `default, *others`, or of `among` (a registry's names, which must hold
    the default), in that order in --help and in the error."""
    choices = tuple(among) or (default, *others)
    if default not in choices:
        raise ValueError(f"default {default!r} is not among the choices {choices}")
    return dataclasses.field(default=default, metadata={"choices": choices})


def choice_list(default: str, *choices: str):
    """A Config field whose value is a comma-separated list of `choices` (default: a list of them)."""
    return dataclasses.field(default=default, metadata={"choices": choices, "comma": True})


def term_option(term: str, default: float, *, above: float | None = None, at_least: float | None = None):
    """An option of the policy-loss term `term` declared beside its field: a finite number > above (or >= at_least),
    that has no effect (a ConfigError) unless --policy-loss is `term`."""
    rule = _float_in(above, lo_open=True) if above is not None else _float_in(at_least)
    return dataclasses.field(default=default, metadata={"rule": rule, "term": term})


def field_rule(f: dataclasses.Field):
    """The check a field declares beside itself (choice, choice_list, term_option), as (test, words); or None."""
    choices = f.metadata.get("choices")
    if choices:
        return _comma_choices(*choices) if f.metadata.get("comma") else _one_of(*choices)
    return f.metadata.get("rule")


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)
RULES = {
    **{
        name: POSITIVE
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "group_size",
            "max_turns",
            "prompts_per_step",
            "curriculum_stages",
            "mc_rollouts",
            "rounds",
            "sft_steps",
            "grpo_steps",
            "sft_batch_size",
            "pass_rate_oversample",
            "minibatches",
            "num_iterations",
            "ppo_epochs",
            "k",
            "samples_per_prompt",
            "max_len",
            "max_new_tokens",
            "threads",
            "n_prompts",
            "pairs_per_prompt",
            "n_train",
            "n",
            "eval_prompts",
            "n_sampled_prompts",
            "workers",
            "sft_steps",
            "pref_steps",
            "toy_steps",
            "starve_steps",
            "gpt_seeds",
            "rft_seeds",
            "lora_alpha",
            "log_every",
            "video_max_frames",
        )
    },
    **{
        name: NON_NEGATIVE
        for name in (
            "warmup_steps",
            "save_every",
            "stop_at_step",
            "eval_n",
            "eval_every",
            "top_k",
            "max_refills",
            "noise_anneal_steps",
            "video_max_pixels",
            "max_episode_tokens",
            "lora_r",
            "probe_every",
            "n_samples",
            "seed",
        )
    },
    **{
        name: _float_in(0.0)
        for name in (
            "lr",
            "time_budget_s",
            "eval_every_s",
            "max_grad_norm",
            "weight_decay",
            "clip_eps_high",
            "vf_coef",
            "chosen_drop_warn",
            "budget_s",
            "gpt_lr",
            "reward_timeout_s",
            "tool_timeout_s",
            "noise_strength",
            "beta_final",
        )
    },
    **{name: _finite() for name in ("positive_threshold", "simpo_gamma")},
    "clip_eps": _float_in(0.0, 1.0, lo_open=True, hi_open=True),
    "value_clip": _float_in(0.0, lo_open=True),
    "top_p": _float_in(0.0, 1.0, lo_open=True),
    "min_lr_ratio": _float_in(0.0, 1.0),
    "neg_mix": _float_in(0.0, 1.0),
    "label_smoothing": _float_in(0.0, 0.5, hi_open=True),
    "noisy_rollout": _float_in(0.0, 1.0),
    "lora_dropout": _float_in(0.0, 1.0, hi_open=True),
    "gamma": _float_in(0.0, 1.0),
    "lam": _float_in(0.0, 1.0),
    "sample_temperature": _float_in(0.0, lo_open=True),
    "temperature": _float_in(0.0, lo_open=True),  # sampling recipes; eval allows 0 (greedy), below
    "beta": _float_in(0.0),  # grpo, ppo: 0 = no KL term; the preference losses need beta > 0, below
    "kl_target": _float_in(0.0),  # grpo, ppo: 0 = a fixed (or scheduled) beta
    "kl_horizon": _float_in(0.0, lo_open=True),
    "vllm_memory": _float_in(0.0, 1.0, lo_open=True),
    "is_cap": _float_in(1.0, lo_open=True),
    "jsd_beta": _float_in(0.0, 1.0),
    "entropy_coef": _float_in(0.0),
    "entropy_target": _float_in(0.0),
    "entropy_coef_delta": _float_in(0.0),
    "entropy_coef_max": _float_in(0.0),
    "top_entropy_quantile": _float_in(0.0, 1.0, lo_open=True),
    "log_completions": NON_NEGATIVE,
    "video_fps": _float_in(0.0, lo_open=True),
}


def _device():
    def ok(v):
        head, _, index = v.partition(":") if isinstance(v, str) else ("", "", "")
        return v in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit())

    return ok, "auto, cpu, cuda or cuda:N"


RULES["device"] = _device()
# (recipe module, option) -> rule, where the range differs between recipes
RECIPE_RULES = {
    ("grpo", "group_size"): _int_at_least(2),  # a group of one has no baseline
    ("online", "k"): _int_at_least(2),  # one sample has nothing to contrast with
    ("preference", "beta"): _float_in(0.0, lo_open=True),
    ("online", "beta"): _float_in(0.0, lo_open=True),
    ("demo", "beta"): _float_in(0.0, lo_open=True),
    ("eval", "temperature"): _float_in(0.0),
    ("eval", "n"): NON_NEGATIVE,  # 0: 200 task prompts, or every item of a benchmark
}


def _benchmark():
    from .data.benchmarks import BENCHMARKS

    ok = lambda v: isinstance(v, str) and (v == "" or v.partition(":")[0] in BENCHMARKS)  # noqa: E731
    return ok, f"one of {', '.join(BENCHMARKS)}, or NAME:LOCAL_COPY (a local copy in the hub dataset's shape)"


RULES["benchmark"] = RULES["eval_benchmark"] = _benchmark()


def flag(name: str) -> str:
    """The command-line flag of an option name: lr_warmup -> --lr-warmup."""
    return "--" + name.replace("_", "-")


def check_config(cfg) -> None:
    """Every option of a Config dataclass against its range or choices (RECIPE_RULES, then what its field declares,
    then RULES), then the options that need another one
    (check_combinations); the first bad one raises ConfigError."""
    recipe = type(cfg).__module__.rsplit(".", 1)[-1]
    for f in dataclasses.fields(cfg):
        rule = RECIPE_RULES.get((recipe, f.name)) or field_rule(f) or RULES.get(f.name)
        if rule is None:
            continue
        ok, what = rule
        value = getattr(cfg, f.name)
        if not ok(value):
            raise ConfigError(f"{flag(f.name)} {value!r}: must be {what}")
    check_combinations(cfg)


def _get(cfg, name: str, default=None):
    return getattr(cfg, name, default)


def _corrects(cfg) -> bool:
    """Whether --is-correction reweights anything: token or sequence, or auto with an engine other than mirl's
    own sampler (recipes/common.py: rollout_corrector)."""
    level = _get(cfg, "is_correction", "none")
    return level in ("token", "sequence") or (level == "auto" and _get(cfg, "engine", "local") != "local")


def _hub_model(cfg) -> bool:
    from .models.hf import is_hub_id

    return is_hub_id(str(_get(cfg, "model", "")))


def _frozen_copy(cfg) -> bool:
    """Whether the run loads a frozen model whose dtype --dtype sets: a reference copy (not under LoRA, whose
    reference is the policy with its adapters off), a distillation teacher or a reward model as a reward."""
    recipe = type(cfg).__module__.rsplit(".", 1)[-1]
    reference = _get(cfg, "lora_r", 0) == 0 and (
        recipe == "online"
        or (recipe == "preference" and _get(cfg, "ref_mode") == "model")
        or (recipe in ("grpo", "ppo") and (_get(cfg, "beta", 0) > 0 or _get(cfg, "beta_final", 0) > 0))
    )
    return reference or recipe == "distill" or "rm:" in str(_get(cfg, "reward", ""))


# An option that only acts when another is set: (options, whether they act in cfg, what they need). Given with
# a value other than its default while it cannot act, it is an error: a setting silently ignored is a run that
# is not the one the user asked for.
NEEDS = [
    (("is_cap", "is_mode"), _corrects, "--is-correction token or sequence (or --engine vllm, where auto is sequence)"),
    (("step_baseline",), lambda c: _get(c, "step_rewards", False), "--step-rewards"),
    (("scale_rewards",), lambda c: _get(c, "advantage", "group") == "group", "--advantage group"),
    (
        ("clip_eps_high",),
        lambda c: _get(c, "policy_loss", "clip") in ("clip", "dual_clip"),
        "--policy-loss clip or dual_clip (cispo's cap is --cispo-cap; sapo has no clip)",
    ),
    (("entropy_coef_delta", "entropy_coef_max"), lambda c: _get(c, "entropy_target", 0) > 0, "--entropy-target > 0"),
    (("curriculum_stages",), lambda c: _get(c, "prompt_sampler") == "curriculum", "--prompt-sampler curriculum"),
    (("pass_rate_oversample",), lambda c: _get(c, "prompt_sampler") == "pass-rate", "--prompt-sampler pass-rate"),
    (("max_refills",), lambda c: _get(c, "dynamic_sampling", False), "--dynamic-sampling"),
    (("max_turns", "max_episode_tokens", "tool_timeout_s"), lambda c: bool(_get(c, "env", "")), "--env"),
    (("vllm_memory",), lambda c: _get(c, "engine") == "vllm", "--engine vllm"),
    (("kl_horizon",), lambda c: _get(c, "kl_target", 0) > 0, "--kl-target > 0 (the adaptive KL controller)"),
    (("beta_final",), lambda c: _get(c, "kl_schedule", "constant") != "constant", "--kl-schedule linear or cosine"),
    (
        ("noise_strength", "noise_anneal_steps", "noise_kinds"),
        lambda c: _get(c, "noisy_rollout", 0) > 0,
        "--noisy-rollout > 0",
    ),
    (("dtype",), _frozen_copy, "a frozen model to load: a reference copy (--beta > 0, no LoRA), a teacher or rm:"),
    (("mc_rollouts",), lambda c: _get(c, "labels") == "mc", "--labels mc"),
    (("lora_alpha", "lora_dropout", "lora_targets"), lambda c: _get(c, "lora_r", 0) > 0, "--lora-r > 0"),
    (("model_revision",), _hub_model, "a hub model id as --model (owner/name); a local folder or preset has none"),
    (("split",), lambda c: bool(_get(c, "data", "")), "--data (a datasets folder or hub dataset with splits)"),
    (("data_config", "revision"), lambda c: bool(_get(c, "data", "")), "--data (a hub dataset)"),
    (("question_column", "answer_column"), lambda c: bool(_get(c, "data", "")), "--data"),
    (
        ("video_fps", "video_max_frames", "video_max_pixels"),
        lambda c: bool(_get(c, "data", "")),
        "--data (rows with a video column; a built-in task renders its own frames)",
    ),
    (("eval_benchmark",), lambda c: _get(c, "eval_n", 0) > 0, "--eval-n > 0 (how many of the benchmark's items)"),
]
# options that act only without --data, per recipe: pairs or examples made from --task
WITHOUT_DATA = {
    "sft": ("n_train",),
    "preference": ("k", "sample_temperature", "n_prompts"),
    "reward_model": ("pairs", "n_prompts", "n_sampled_prompts", "eval_prompts", "k", "pairs_per_prompt"),
}


def check_combinations(cfg) -> None:
    """Options that cannot act in this combination (NEEDS, WITHOUT_DATA) and values that contradict another
    option: ConfigError naming the option, its value and what it needs. Trackers: installed, W&B logged in."""
    recipe = type(cfg).__module__.rsplit(".", 1)[-1]
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for f in dataclasses.fields(cfg):  # a policy-loss term's own options (term_option)
        term = f.metadata.get("term")
        if term and getattr(cfg, f.name) != f.default and _get(cfg, "policy_loss") != term:
            raise ConfigError(f"{flag(f.name)} {getattr(cfg, f.name)!r} has no effect: it needs --policy-loss {term}")
    for names, acts, needs in NEEDS:
        for name in names:
            if name in defaults and getattr(cfg, name) != defaults[name] and not acts(cfg):
                raise ConfigError(f"{flag(name)} {getattr(cfg, name)!r} has no effect: it needs {needs}")
    for name in WITHOUT_DATA.get(recipe, ()):
        if _get(cfg, "data") and getattr(cfg, name) != defaults[name]:
            what = "pairs sampled from --task" if recipe != "sft" else "examples made from --task"
            raise ConfigError(f"{flag(name)} {getattr(cfg, name)!r} has no effect with --data: it is for {what}")
    if _get(cfg, "env") and "task" in defaults and cfg.task not in (defaults["task"], ""):
        raise ConfigError(f"--task {cfg.task!r} has no effect with --env: the environment is the task (drop one)")
    if recipe == "sft" and _get(cfg, "data") and cfg.task and cfg.task != defaults["task"]:
        raise ConfigError(f"--task {cfg.task!r} has no effect with --data: sft trains on --data alone (drop one)")
    if _get(cfg, "entropy_target", 0) > 0 and _get(cfg, "entropy_coef", 0) > _get(cfg, "entropy_coef_max", 0):
        raise ConfigError(
            f"--entropy-coef {cfg.entropy_coef!r} is above --entropy-coef-max {cfg.entropy_coef_max!r}: with "
            "--entropy-target the coefficient starts at --entropy-coef and is kept at most --entropy-coef-max"
        )
    if _get(cfg, "kl_target", 0) > 0 and (cfg.beta <= 0 or _get(cfg, "kl_schedule", "constant") != "constant"):
        raise ConfigError(
            f"--kl-target {cfg.kl_target!r} (the adaptive KL controller) needs --beta > 0 (its starting value)"
            + (" and --kl-schedule constant" if hasattr(cfg, "kl_schedule") else "")
        )
    if _get(cfg, "noisy_rollout", 0) > 0 and _get(cfg, "engine", "local") != "local":
        raise ConfigError("--noisy-rollout samples from perturbed pixels: it needs --engine local")
    if recipe == "eval" and cfg.k == 1 and not cfg.n_samples and cfg.temperature != defaults["temperature"]:
        raise ConfigError(
            f"--temperature {cfg.temperature!r} has no effect: it is for sampling, with --n-samples or --k > 1"
        )
    if recipe == "eval" and 0 < cfg.n_samples < cfg.k:
        raise ConfigError(f"--n-samples {cfg.n_samples}: pass@{cfg.k} and maj@{cfg.k} need at least --k samples")
    if (_get(cfg, "eval_every", 0) or _get(cfg, "eval_every_s", 0)) and _get(cfg, "eval_n", 1) == 0:
        which = "--eval-every" if _get(cfg, "eval_every", 0) else "--eval-every-s"
        raise ConfigError(f"{which} has no effect with --eval-n 0 (no held-out prompts to evaluate)")
    if _get(cfg, "report_to"):
        from .logging import check_trackers, parse_report_to

        check_trackers(parse_report_to(cfg.report_to))
