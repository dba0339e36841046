"""The fast decode path (models/decode.py): a preallocated KV cache and the snapshotted decode weights give the
tokens and log-probs of the model's own forward and cache, for every backend, with images and with LoRA."""

import pytest
import torch
from test_rollout import _eos_bias, _ragged_prompts, _same_batch

from mirl.models import load_policy
from mirl.models.decode import StaticCache, linear_weights
from mirl.rollout import generate


def _hf_text(tmp_path, kind):
    """A tiny Llama / Qwen3 (q_norm, k_norm) / Mistral with the Qwen2 fixture's tokenizer."""
    import conftest
    from transformers import AutoTokenizer

    src = conftest.build_hf_tiny(tmp_path / "qwen2")
    tok = AutoTokenizer.from_pretrained(src)
    common = conftest.tiny_text_config(tok, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(1)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True))
    elif kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))
    else:
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
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


@pytest.mark.parametrize("kind", ["tiny", "tiny-vlm", "qwen2", "llama", "qwen3", "mistral", "qwen2-vl"])
@pytest.mark.parametrize("lora", [False, True])
def test_static_decode_equals_the_models_own_cache(kind, lora, tmp_path, hf_tiny_dir, hf_vlm_dir):
    """Same seed, same tokens and log-probs (to float32 rounding), rows ending at different steps (the finished
    rows are cut from both caches), with LoRA adapters whose update is non-zero, and with the adapters
    disabled (the reference a LoRA run decodes from)."""
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
