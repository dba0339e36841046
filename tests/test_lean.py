"""The memory-lean RMSNorm and SwiGLU (models/lean.py): the loss and every gradient of the model's own modules,
with fewer bytes kept for the backward pass (counted with saved-tensor hooks, against the derived saving)."""

import copy

import pytest
import torch
from test_decode import _hf_text

from mirl.models import load_policy
from mirl.models.lean import lean_layers


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _pair(kind, tmp_path, hf_tiny_dir):
    policy = load_policy(hf_tiny_dir) if kind == "qwen2" else load_policy(_hf_text(tmp_path, kind))
    plain = copy.deepcopy(policy.model)
    for m in plain.modules():  # the deep copy carries the per-instance forward: restore the classes' own
        m.__dict__.pop("forward", None)
    return policy.model, plain


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("lora", [False, True])
def test_lean_layers_give_the_same_loss_and_gradients(kind, lora, tmp_path, hf_tiny_dir):
    lean, plain = _pair(kind, tmp_path, hf_tiny_dir)
    assert not any("forward" in m.__dict__ for m in plain.modules())
    assert any("forward" in m.__dict__ for m in lean.modules())  # load_policy switched them on
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        lean, plain = get_peft_model(lean, LoraConfig(**cfg)), get_peft_model(plain, LoraConfig(**cfg))
        plain.load_state_dict(lean.state_dict())
    ids = torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    losses = []
    for model in (lean, plain):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads
    for n, p in lean.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lean_layers_keep_the_derived_bytes_fewer(hf_tiny_dir, tmp_path):
    """Per token and layer the lean model keeps 2C + 2I fewer floats: C for each of the two RMSNorms (the
    normalised copy), 2I for the MLP (silu(gate) and the product); C = 32, I = 64 in the fixture."""
    lean, plain = _pair("qwen2", tmp_path, hf_tiny_dir)
    ids = torch.randint(3, 200, (4, 50), generator=torch.Generator().manual_seed(0))
    got = {}
    for name, model in (("lean", lean), ("plain", plain)):
        got[name], out = _saved_bytes(lambda m=model: m(input_ids=ids, labels=ids).loss)
    cfg = plain.config
    derived = ids.numel() * cfg.num_hidden_layers * (2 * cfg.hidden_size + 2 * cfg.intermediate_size) * 4
    saving = got["plain"] - got["lean"]
    assert saving >= derived, (saving, derived, got)
    assert saving <= 1.5 * derived  # nothing else changed much either


def test_lean_layers_leave_other_families_alone(tmp_path, hf_tiny_dir):
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    tok = AutoTokenizer.from_pretrained(hf_tiny_dir)
    model = GraniteForCausalLM(
        GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    )
    assert lean_layers(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_bf16_autocast_through_lean_layers(hf_tiny_dir):
    """Under bf16 autocast the MLP's inputs are bf16: the unfused SwiGLU runs; the loss is finite and close to
    float32's."""
    policy = load_policy(hf_tiny_dir)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = policy.model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref = policy.model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(float(loss) - float(ref)) < 0.05
