"""What reaches vLLM besides plain weights: a LoRA adapter on the token embedding (merged into the embedding
sent by sync), and the generation config's extra EOS ids (both engines end a sample on the same set)."""

import pytest
import torch
from conftest import SIZES, models
from test_vllm_engine import MEMORY, PROMPTS, gap, ids_of

from mirl.models.policy import load_policy
from mirl.rollout.engine import LocalEngine, SamplingSettings, VLLMEngine


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny Qwen2 with untied embeddings (an embedding adapter then leaves the head alone in both engines) whose
    generation config also ends on the third greedy token of the first prompt: -> (folder, that token)."""
    from transformers import AutoModelForCausalLM

    src = models.build_hf_tiny(tmp_path_factory.mktemp("untied"), tie_word_embeddings=False, **SIZES)
    policy = load_policy(str(src))
    greedy = LocalEngine(policy).generate(ids_of(policy, PROMPTS), 1, SamplingSettings(12, temperature=0.0))
    extra = int(greedy.response_ids[0, 2])
    model = AutoModelForCausalLM.from_pretrained(src)
    model.generation_config.eos_token_id = [policy.tokenizer.eos_token_id, extra]
    out = tmp_path_factory.mktemp("two_eos")
    model.save_pretrained(str(out))
    policy.tokenizer.save_pretrained(str(out))
    return out, extra


@pytest.fixture(scope="module")
def engine(untied, tmp_path_factory):
    engine = VLLMEngine(load_policy(str(untied[0])), tmp_path_factory.mktemp("vllm") / "model", memory=MEMORY)
    yield engine
    engine.close()


def test_both_engines_stop_on_the_generation_configs_extra_eos(untied, engine):
    folder, extra = untied
    policy = load_policy(str(folder))
    greedy = SamplingSettings(max_new_tokens=12, temperature=0.0)
    a = engine.generate(ids_of(policy, PROMPTS), 1, greedy)
    b = LocalEngine(policy).generate(ids_of(policy, PROMPTS), 1, greedy)
    assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.response_ids * a.response_mask, b.response_ids * b.response_mask)
    n = int(b.response_mask[0].sum())
    assert n <= 3 and int(b.response_ids[0, n - 1]) == extra and not b.truncated[0]


def test_embedding_lora_reaches_vllm(untied, engine):
    policy = load_policy(str(untied[0]))
    policy.add_lora(r=4, alpha=8, targets="embed_tokens,q_proj,v_proj")
    torch.manual_seed(3)
    for name, p in policy.model.named_parameters():
        if "lora_" in name:  # PEFT starts B (embedding: A) at zero: give every adapter an effect
            p.data.normal_(0, 0.3)
    engine.sync(policy)
    settings = SamplingSettings(max_new_tokens=10)
    out = engine.generate(ids_of(policy, PROMPTS), 2, settings, generator=torch.Generator().manual_seed(2))
    assert gap(policy, out) < 1e-4
    emb = policy.model.get_input_embeddings()
    emb.enable_adapters(False)  # the embedding's adapter alone off: another policy, so the adapter did reach vLLM
    assert gap(policy, out) > 0.01
    emb.enable_adapters(True)
