"""The fast decode path (models/decode.py): a preallocated KV cache and the snapshotted decode weights give the
tokens and log-probs of the model's own forward and cache, for every backend, with images and with LoRA."""

import pytest
import torch
from test_rollout import _eos_bias, _ragged_prompts, _same_batch

import mirl.cpu
from mirl.cpu import DecodeProducts
from mirl.models import load_policy
from mirl.models.decode import StaticCache, linear_weights
from mirl.rollout import generate


def _hf_text(tmp_path, kind, **config):
    """A tiny Llama / Qwen3 (q_norm, k_norm) / Mistral with the Qwen2 fixture's tokenizer; config overrides."""
    import conftest
    from transformers import AutoTokenizer

    src = conftest.build_hf_tiny(tmp_path / "qwen2")
    tok = AutoTokenizer.from_pretrained(src)
    common = conftest.tiny_text_config(tok, **{"max_position_embeddings": 256, "tie_word_embeddings": False, **config})
    torch.manual_seed(1)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**{"attention_bias": True, **common}))
    elif kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    else:
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**{"sliding_window": None, **common}))
    out = tmp_path / kind
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _policy_and_prompts(kind, tmp_path, hf_tiny_dir, hf_vlm_dir):
    from PIL import Image

    images = None
    if kind == "tiny":
        policy = load_policy("gpt-nano", seed=0)
    elif kind == "tiny-vlm":
        policy = load_policy("vlm-nano", seed=0)
        enc = [policy.encode_prompt("<image>n:", [Image.new("RGB", (32, 32), (40 * i, 90, 200))]) for i in range(5)]
        return policy, [ids for ids, _ in enc], [im for _, im in enc]
    elif kind == "qwen2":
        policy = load_policy(hf_tiny_dir)
    elif kind == "qwen2-vl":
        policy = load_policy(hf_vlm_dir)
        enc = [policy.encode_prompt("<image>count:", [Image.new("RGB", (28, 28), (30 * i, 90, 200))]) for i in range(5)]
        return policy, [ids for ids, _ in enc], [im for _, im in enc]
    else:
        policy = load_policy(_hf_text(tmp_path, kind))
    return policy, _ragged_prompts(policy, 10), images


ONEDNN_EVERYWHERE = DecodeProducts(True, True, 0, "every product through oneDNN (the test)")
MKL_EVERYWHERE = DecodeProducts(False, False, 0, "every product through torch's matmul (the test)")


@pytest.mark.parametrize("kind", ["tiny", "tiny-vlm", "qwen2", "llama", "qwen3", "mistral", "qwen2-vl"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("products", ["matmul", "onednn"])
def test_static_decode_equals_the_models_own_cache(kind, lora, products, tmp_path, hf_tiny_dir, hf_vlm_dir,
                                                  monkeypatch):  # fmt: skip
    """Same seed, same tokens and log-probs (to float32 rounding), rows ending at different steps (the finished
    rows are cut from both caches), with LoRA adapters whose update is non-zero, and with the adapters
    disabled (the reference a LoRA run decodes from); with every product through torch's matmul, and every
    product through oneDNN's prepacked weights (what an AMD CPU takes, mirl/cpu.py: decode_products)."""
    if products == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    choice = ONEDNN_EVERYWHERE if products == "onednn" else MKL_EVERYWHERE
    monkeypatch.setattr(mirl.cpu, "this_cpu_decode_products", lambda: choice)
    policy, prompts, images = _policy_and_prompts(kind, tmp_path, hf_tiny_dir, hf_vlm_dir)
    if lora:
        policy.add_lora(r=4, alpha=8)
        torch.manual_seed(2)
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: give the adapters an effect
                p.data.normal_(0, 0.3)
    ids, mask = torch.tensor([prompts[0]]), torch.ones(1, len(prompts[0]), dtype=torch.long)
    _, cache = policy.start_decode(ids, mask, 4, images=None if images is None else images[0])
    assert isinstance(cache, StaticCache)  # the fast path is the one under test
    weights = [getattr(lay, f) for lay in cache.decoder.layers for f in ("qkv", "o", "mlp_in", "mlp_out")]
    packed = [w.packed is not None for w in [*weights, cache.decoder.head]]
    assert all(packed) == (products == "onednn") and any(packed) == (products == "onednn")
    eos = policy.tokenizer.eos_token_id
    for reference in [False, True] if lora else [False]:
        runs = {}
        for static in (False, True):
            g = torch.Generator().manual_seed(7)
            ctx = policy.reference_context() if reference else _nothing()
            with ctx, _eos_bias(policy, eos, 0.4):
                runs[static] = generate(
                    policy,
                    prompts,
                    max_new_tokens=14,
                    samples_per_prompt=2,
                    temperature=1.0,
                    generator=g,
                    images=images,
                    static_cache=static,
                )
        assert len(set(runs[False].response_mask.sum(1).tolist())) > 1  # rows ended at different steps
        _same_batch(runs[False], runs[True])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_lora_linear_weights_compute_what_the_layer_computes(hf_tiny_dir):
    """linear_weights of a PEFT LoRA layer = base weight + scaled B @ A while the adapters are on, the base
    weight alone inside disable_adapter()."""
    policy = load_policy(hf_tiny_dir)
    policy.add_lora(r=4, alpha=16)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    layer = policy._base().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    w, b = linear_weights(layer)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, b), layer(x), atol=1e-5, rtol=0)
    with policy.reference_context():
        w0, b0 = linear_weights(layer)
        torch.testing.assert_close(torch.nn.functional.linear(x, w0, b0), layer(x), atol=1e-6, rtol=0)
    assert (w - w0).abs().max() > 1e-3  # the adapters do change the weight


def test_unsupported_models_keep_their_own_forward(tmp_path, hf_tiny_dir):
    """A family outside the allow-list (Granite scales its logits) or with sliding-window layers decodes through
    its own forward and cache: start_decode returns the transformers cache, and generation still works."""
    import conftest
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(hf_tiny_dir)
    common = conftest.tiny_text_config(tok)
    models = {
        "granite": GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0)),
        "sliding": Qwen2ForCausalLM(
            Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=0)
        ),
    }
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
        policy = load_policy(tmp_path / name)
        ids = torch.tensor([tok.encode("1+2=")])
        _, cache = policy.start_decode(ids, torch.ones_like(ids), 4)
        assert not isinstance(cache, StaticCache), name
        out = generate(policy, [ids[0].tolist()], max_new_tokens=4, temperature=0)
        assert out.response_ids.shape[0] == 1


def _forward_logps(model, batch):
    """Log-probs (B, R, V) of transformers' own forward over prompt + response, at the response positions."""
    ids, attn, _ = batch.full()
    p = batch.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return torch.log_softmax(logits[:, p - 1 : -1].float(), -1)


def _equal_length_prompts(n, length, vocab):
    """n prompts of `length` token ids each: no padding, so transformers' forward sees each row as it is."""
    return [[(5 + 7 * i + 13 * j) % vocab for j in range(length)] for i in range(n)]


def test_sliding_window_of_mistral_is_applied(tmp_path):
    """Mistral declares sliding_window=8 without layer_types: every layer attends to its last 8 positions. Prompts of
    6 tokens + 12 greedy tokens run past the window; the tokens and log-probs of generate (whichever decode path it
    takes) are the arg-max and log-probs of transformers' own forward over the whole sequence. The window does bite:
    the same forward without it gives other log-probs. A window longer than prompt + new tokens masks nothing: such
    a model (Mistral-7B-v0.1 declares 4096) keeps the fast path."""
    policy = load_policy(_hf_text(tmp_path, "mistral", sliding_window=8))
    prompts = _equal_length_prompts(6, 6, len(policy.tokenizer))
    ids = torch.tensor(prompts[:1])
    assert not isinstance(policy.start_decode(ids, torch.ones_like(ids), 12)[1], StaticCache)
    wide = load_policy(_hf_text(tmp_path / "wide", "mistral", sliding_window=18))
    assert isinstance(wide.start_decode(ids, torch.ones_like(ids), 12)[1], StaticCache)
    out = generate(wide, prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    logps = _forward_logps(wide.model, out)
    torch.testing.assert_close(logps.gather(-1, out.response_ids[..., None])[..., 0], out.logps, atol=2e-5, rtol=0)
    out = generate(policy, prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert out.response_ids.shape == (6, 12)
    logps = _forward_logps(policy.model, out)
    assert torch.equal(logps.argmax(-1), out.response_ids)
    torch.testing.assert_close(logps.gather(-1, out.response_ids[..., None])[..., 0], out.logps, atol=2e-5, rtol=0)
    policy.model.config.sliding_window = None
    assert (_forward_logps(policy.model, out) - logps).abs().max() > 1e-3


ROPE = {
    "longrope": dict(short_factor=[1.0] * 4, long_factor=[3.0] * 4, original_max_position_embeddings=8),
    "dynamic": dict(factor=4.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=64),
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
}


@pytest.mark.parametrize("rope_type", list(ROPE))
def test_length_dependent_rope_decodes_as_the_models_own_cache(rope_type, tmp_path):
    """longrope switches to its long factors once the sequence passes original_max_position_embeddings (8 here:
    prompts of 6 tokens + 10 new ones cross it), dynamic NTK rescales past max_position_embeddings: both depend on
    the length at run time, so they decode through the model's own forward and cache (the fast path's one rope
    table would give every step the long factors). yarn and llama3 are fixed functions of the position and keep
    the fast path. Either way the greedy tokens and log-probs are those of the plain path; for all but longrope
    also those of one forward over the whole sequence (longrope's cached keys keep the short factors they were
    computed with, as in transformers' own cached forward, while one forward over 16 positions uses the long
    factors throughout)."""
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE[rope_type]}
    policy = load_policy(_hf_text(tmp_path, "llama", rope_parameters=rope))
    assert policy._base().model.rotary_emb.rope_type == rope_type
    prompts = _equal_length_prompts(4, 6, len(policy.tokenizer))
    ids = torch.tensor(prompts[:1])
    _, cache = policy.start_decode(ids, torch.ones_like(ids), 10)
    assert isinstance(cache, StaticCache) == (rope_type in ("yarn", "llama3"))
    runs = {
        s: generate(policy, prompts, max_new_tokens=10, temperature=0, ignore_eos=True, static_cache=s)
        for s in (False, True)
    }
    _same_batch(runs[False], runs[True])
    if rope_type == "longrope":
        return
    logps = _forward_logps(policy.model, runs[True])
    torch.testing.assert_close(
        logps.gather(-1, runs[True].response_ids[..., None])[..., 0], runs[True].logps, atol=2e-5, rtol=0
    )


@pytest.mark.parametrize("kind", ["tiny", "llama"])
def test_lora_on_the_token_embedding_reaches_the_decode_steps(kind, tmp_path):
    """An adapter on the embedding (--lora-targets embed_tokens,...) changes every token's input vector: the fast
    decode embeds through the adapted module, so it samples what the model's own forward samples, adapters on
    and off."""
    if kind == "tiny":
        policy, targets = load_policy("gpt-nano", seed=0), "wte,qkv"
    else:
        policy, targets = load_policy(_hf_text(tmp_path, kind)), "embed_tokens,q_proj"
    policy.add_lora(r=4, alpha=8, targets=targets)
    torch.manual_seed(2)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name or "lora_embedding" in name:  # (PEFT starts embedding A at zero)
            p.data.normal_(0, 0.3)
    prompts = _ragged_prompts(policy, 8)
    ids = torch.tensor([prompts[0]])
    _, cache = policy.start_decode(ids, torch.ones_like(ids), 4)
    assert isinstance(cache, StaticCache)
    for reference in (False, True):
        runs = {}
        for static in (False, True):
            ctx = policy.reference_context() if reference else _nothing()
            with ctx:
                g = torch.Generator().manual_seed(7)
                runs[static] = generate(
                    policy, prompts, max_new_tokens=10, samples_per_prompt=2, generator=g, static_cache=static
                )
        _same_batch(runs[False], runs[True])
    with torch.no_grad(), policy.reference_context():
        off = policy(ids).logits
    assert (policy(ids).logits - off).abs().max() > 1e-3  # the adapters change the outputs


@pytest.mark.parametrize("static", [False, True])
def test_no_forward_after_the_last_token(static, hf_tiny_dir):
    """max_new_tokens=N tokens take N forwards: the prefill (whose logits give the first token) and N - 1 steps.
    The N-th token is sampled from the (N-1)-th step's logits and feeds nothing."""
    policy = load_policy(hf_tiny_dir)
    calls, step = [0], policy.step

    def counted(*a, **k):
        calls[0] += 1
        return step(*a, **k)

    policy.step = counted
    out = generate(
        policy, _ragged_prompts(policy, 3), max_new_tokens=5, temperature=0, ignore_eos=True, static_cache=static
    )
    assert out.response_ids.shape[1] == 5
    assert calls[0] == 5


@pytest.mark.parametrize("kind", ["tiny", "qwen2", "llama", "mistral"])
@pytest.mark.parametrize("static", [False, True])
def test_a_group_prefills_its_prompt_once(kind, static, tmp_path, hf_tiny_dir, hf_vlm_dir, monkeypatch):
    """generate() with 3 samples per prompt prefills each (ragged, left-padded) prompt once and copies its cache to
    the group's rows: the same tokens and log-probs as prefilling every row, on either cache; one prefill row per
    prompt is what the model sees."""
    policy, prompts, _ = _policy_and_prompts(kind, tmp_path, hf_tiny_dir, hf_vlm_dir)
    seen, start, share = [], policy.start_decode, [True]
    monkeypatch.setattr(
        policy, "start_decode", lambda *a, shared=None, **k: start(*a, shared=shared if share[0] else None, **k)
    )
    runs = {}
    for share[0] in (False, True):
        seen.clear()
        with _eos_bias(policy, policy.tokenizer.eos_token_id, 0.4):
            # (the context deletes this instance attribute at its end)
            policy.step = lambda ids, *a, biased=policy.step, **k: seen.append(ids.shape[0]) or biased(ids, *a, **k)
            runs[share[0]] = generate(policy, prompts, max_new_tokens=10, samples_per_prompt=3,
                                      generator=torch.Generator().manual_seed(3), static_cache=static)  # fmt: skip
        assert seen[0] == (len(prompts) if share[0] else 3 * len(prompts))  # the prefill's rows
    assert len(set(runs[False].response_mask.sum(1).tolist())) > 1  # rows ended at different steps
    _same_batch(runs[False], runs[True])
