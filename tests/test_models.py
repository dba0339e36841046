"""The Policy interface over the tiny GPT and a transformers model: padding, cache, save/load."""

import pytest
import torch

from mirl.models import load_policy
from mirl.models.policy import positions_from_mask
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
    with pytest.raises(FileNotFoundError, match="neither a preset .*gpt-nano"):
        load_policy("gpt-huge")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
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
