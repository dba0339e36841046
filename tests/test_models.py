"""The Policy interface over the tiny GPT and a transformers model: padding, cache, save/load."""

import inspect

import pytest
import torch

from mirl.models import load_policy
from mirl.models.backends import positions_from_mask
from mirl.rollout import left_pad


def _policies(hf_tiny_dir):
    return [load_policy("gpt-nano", seed=0), load_policy(hf_tiny_dir)]


@pytest.mark.parametrize("which", [0, 1], ids=["tiny", "hf"])
def test_left_padding_matches_unpadded(which, hf_tiny_dir):
    policy = _policies(hf_tiny_dir)[which].eval()
    seqs = [[5, 6, 7, 8, 9, 10], [7, 8, 9]]
    ids, mask = left_pad(seqs, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = policy(ids, mask).logits
        alone = policy(torch.tensor([seqs[1]]), torch.ones(1, 3, dtype=torch.long)).logits
    torch.testing.assert_close(batched[1, -3:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1], ids=["tiny", "hf"])
def test_kv_cache_matches_full_forward(which, hf_tiny_dir):
    policy = _policies(hf_tiny_dir)[which].eval()
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [7, 8, 9, 11]], policy.tokenizer.pad_token_id)
    with torch.no_grad():
        full = policy(ids, mask).logits
        logits, cache = policy.step(ids[:, :4], mask[:, :4])
        outs = [logits]
        for t in range(4, ids.shape[1]):
            logits, cache = policy.step(ids[:, t : t + 1], mask[:, : t + 1], cache)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_positions_from_mask():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_tiny_save_load_roundtrip(tmp_path):
    p = load_policy("gpt-micro", seed=3)
    assert p.model.config.n_layer == 3 and p.model.config.n_embd == 192
    p.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    q = load_policy(tmp_path / "m")
    ids = torch.tensor([[4, 5, 6]])
    torch.testing.assert_close(p(ids).logits, q(ids).logits)


def test_size_dial_and_bad_preset():
    assert load_policy("gpt-d5").model.config.n_embd == 320
    with pytest.raises(FileNotFoundError, match="no such file or folder: gpt-huge .*a preset: gpt-nano"):
        load_policy("gpt-huge")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_policy("/nonexistent/model")


def test_hf_save_stays_loadable_by_transformers(hf_tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = load_policy(hf_tiny_dir)
    with torch.no_grad():
        for prm in p.model.parameters():
            prm.add_(0.01)
    p.save(tmp_path / "saved")
    assert list((tmp_path / "saved").glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    tok = AutoTokenizer.from_pretrained(tmp_path / "saved")
    ids = torch.tensor([tok.encode("12+3=15")])
    torch.testing.assert_close(model(ids).logits, p(ids).logits, atol=1e-6, rtol=1e-6)
    # the chat template travels with the tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_text_policy_rejects_images():
    p = load_policy("gpt-nano")
    with pytest.raises(ValueError, match="text-only"):
        p(torch.tensor([[4, 5]]), images=[torch.zeros(3, 8, 8)])


def test_max_len_error():
    p = load_policy("gpt-nano", max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len 8"):
        p(torch.ones(1, 9, dtype=torch.long))


def test_hf_step_passes_the_cache_by_the_name_the_forward_takes(hf_tiny_dir):
    """transformers 5 renamed forward's past_key_values to cache (the old name warns, and goes in 5.40): the step
    passes and reads the cache under the name the model's forward declares, new or old, and the installed
    transformers sees no deprecated keyword."""
    import warnings
    from types import SimpleNamespace

    from mirl.models.backends import HFBackend

    class New(torch.nn.Module):
        config = SimpleNamespace(model_type="new")

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None):
            return SimpleNamespace(logits=input_ids.float(), cache=("new", cache))

    class Old(torch.nn.Module):
        config = SimpleNamespace(model_type="old")

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            return SimpleNamespace(logits=input_ids.float(), past_key_values=("old", past_key_values))

    ids = torch.tensor([[5, 6]])
    for model in (New(), Old()):
        _, (cache, _) = HFBackend(model).step(model, ids, torch.ones_like(ids), ids, None, ("prev", None), True, {})
        assert cache == (model.config.model_type, "prev")
    policy = load_policy(hf_tiny_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, cache = policy.step(ids, torch.ones_like(ids))
        policy.step(ids[:, :1], torch.ones(1, 3, dtype=torch.long), cache)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def _two_eos_model(tmp_path, hf_tiny_dir):
    """The tiny Qwen2 whose generation_config ends on [the tokenizer's EOS, the token of '7'] (as Llama-3 and
    Qwen2.5-Instruct list several): -> (folder, the extra id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tiny_dir)
    extra = tok.convert_tokens_to_ids("7")
    model = AutoModelForCausalLM.from_pretrained(hf_tiny_dir)
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    model.save_pretrained(str(tmp_path / "two_eos"))
    tok.save_pretrained(str(tmp_path / "two_eos"))
    return tmp_path / "two_eos", extra


def test_eos_ids_are_the_union_of_config_generation_config_and_tokenizer(tmp_path, hf_tiny_dir):
    from mirl.models.tokenizer import eos_token_ids

    assert eos_token_ids(2, [5, 2], None, (9,)) == (2, 5, 9)
    assert eos_token_ids(None) == ()
    folder, extra = _two_eos_model(tmp_path, hf_tiny_dir)
    policy = load_policy(folder)
    assert policy.eos_ids == tuple(sorted({policy.tokenizer.eos_token_id, extra}))
    assert load_policy("gpt-nano").eos_ids == (2,)  # the character tokenizer's <eos>


@pytest.mark.parametrize("static", [False, True])
def test_generation_stops_on_every_eos_id_of_the_generation_config(static, tmp_path, hf_tiny_dir):
    """vLLM ends a sample on any of generation_config.eos_token_id; the built-in sampler must end on the same set.
    Here the extra EOS is made the likeliest token from the third step on: every row ends there, not truncated."""
    from mirl.rollout import generate

    folder, extra = _two_eos_model(tmp_path, hf_tiny_dir)
    policy = load_policy(folder)
    step, calls = policy.step, [0]

    def biased(*a, **k):
        logits, cache = step(*a, **k)
        calls[0] += 1
        if calls[0] >= 3:
            logits = logits.clone()
            logits[..., extra] += 100.0
        return logits, cache

    policy.step = biased
    out = generate(policy, [[5, 6, 7], [8, 9]], max_new_tokens=8, temperature=0, static_cache=static)
    assert out.response_mask.sum(1).tolist() == [3, 3]
    assert out.response_ids[:, 2].tolist() == [extra, extra]
    assert not out.truncated.any()


def test_vllm_engine_stops_on_the_same_eos_ids(tmp_path, hf_tiny_dir):
    """The vLLM engine hands the sampler's EOS set (Policy.eos_ids) to SamplingParams.stop_token_ids (a stand-in
    for vLLM's LLM records the parameters: no vLLM needed)."""
    from types import SimpleNamespace

    from mirl.rollout.engine import SamplingSettings, VLLMEngine

    class LLM:
        def generate(self, requests, params, use_tqdm=False):
            self.params = params
            one = lambda i: SimpleNamespace(index=i, token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-1.0)}])
            outs = lambda p: [SimpleNamespace(**vars(one(i)), finish_reason="stop") for i in range(p["n"])]
            return [SimpleNamespace(outputs=outs(p)) for p in params]

    folder, extra = _two_eos_model(tmp_path, hf_tiny_dir)
    engine = VLLMEngine.__new__(VLLMEngine)  # without vLLM's engine: only generate's translation is under test
    engine.policy, engine.banned, engine.llm = load_policy(folder), [], LLM()
    engine.SamplingParams = dict
    out = engine.generate([[5, 6]], 2, SamplingSettings(max_new_tokens=4))
    assert engine.llm.params[0]["stop_token_ids"] == sorted({engine.policy.tokenizer.eos_token_id, extra})
    assert out.response_ids.shape == (2, 1)
    engine.generate([[5, 6]], 1, SamplingSettings(max_new_tokens=4, ignore_eos=True))
    assert engine.llm.params[0]["stop_token_ids"] == []


def _members(protocol) -> dict:
    """A Protocol's attributes (None) and methods (their parameters: name, kind, default)."""
    out = dict.fromkeys(protocol.__annotations__)
    for name, fn in vars(protocol).items():
        if callable(fn) and not name.startswith("_"):
            out[name] = [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    return out


def test_backends_and_engines_have_every_member_of_their_protocol(hf_tiny_dir):
    """TinyBackend and HFBackend (models/backends.py: Backend), LocalEngine and VLLMEngine (rollout/engine.py:
    Engine) have each attribute and each method of their interface, with the same parameters."""
    from mirl.models.backends import Backend
    from mirl.rollout.engine import Engine, LocalEngine, VLLMEngine

    hf = load_policy(hf_tiny_dir)
    cases = [(Backend, load_policy("gpt-nano").backend), (Backend, hf.backend)]
    cases += [(Engine, LocalEngine(hf)), (Engine, VLLMEngine.__new__(VLLMEngine))]
    for protocol, impl in cases:
        for name, params in _members(protocol).items():
            assert hasattr(impl, name), (type(impl).__name__, name)
            if params is not None:
                got = [
                    (p.name, p.kind, p.default)
                    for p in inspect.signature(getattr(type(impl), name)).parameters.values()
                ]
                assert got == params, (type(impl).__name__, name, got, params)
    assert [hf.backend.serves_vllm, load_policy("gpt-nano").backend.serves_vllm] == [True, False]
