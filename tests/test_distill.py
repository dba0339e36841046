"""On-policy distillation (losses/distill.py, recipes/distill.py): the divergence against a loop and TRL's
GKDTrainer formula, its invariances, and `mirl distill` moving a student towards its teacher."""

import itertools
import math

import pytest
import torch

from mirl.losses.distill import generalized_jsd


def _jsd_loop(s_logits, t_logits, beta, temperature):
    out = torch.zeros(s_logits.shape[:-1])
    for idx in itertools.product(*(range(n) for n in s_logits.shape[:-1])):
        s = torch.softmax(s_logits[idx] / temperature, -1).tolist()
        t = torch.softmax(t_logits[idx] / temperature, -1).tolist()
        m = [beta * b + (1 - beta) * a for a, b in zip(s, t)]
        kl = lambda p, q: sum(x * (math.log(x) - math.log(y)) for x, y in zip(p, q) if x > 0)
        out[idx] = beta * kl(t, m) + (1 - beta) * kl(s, m) if 0 < beta < 1 else (kl(s, t) if beta == 1 else kl(t, s))
    return out


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_loop_and_trl_formula(beta):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g) * 2
    ours = generalized_jsd(s, t, beta=beta, temperature=0.8)
    torch.testing.assert_close(ours, _jsd_loop(s, t, beta, 0.8), atol=1e-5, rtol=1e-5)
    labels = torch.ones(3, 4, dtype=torch.long)
    labels[1, 2:] = -100  # TRL's masked token mean (reduction batchmean)
    trl = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=0.8)
    mask = (labels != -100).float()
    torch.testing.assert_close((ours * mask).sum() / mask.sum(), trl, atol=1e-5, rtol=1e-5)


def test_divergence_is_zero_at_the_teacher_and_its_gradient_reaches_the_student_only():
    t = torch.randn(5, 9)
    for beta in (0.0, 0.5, 1.0):
        assert float(generalized_jsd(t.clone(), t, beta=beta).abs().max()) < 1e-6
    s = torch.randn(5, 9, requires_grad=True)
    t.requires_grad_(True)
    generalized_jsd(s, t, beta=1.0).sum().backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    # reverse KL by hand for two-token distributions: sum_v p_s (log p_s - log p_t)
    ps, pt = torch.tensor([[0.25, 0.75]]), torch.tensor([[0.5, 0.5]])
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(generalized_jsd(ps.log(), pt.log(), beta=1.0)) == pytest.approx(want, abs=1e-6)


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
    """A gpt-micro teacher trained longer on sums of up to two digits and a weak gpt-nano student. arith:2, not
    arith:1: the held-out split of arith:1 has 16 distinct pairs, too few for a steady accuracy (docs/rl.md)."""
    from mirl.recipes import sft

    out = tmp_path_factory.mktemp("distill")
    common = dict(task="arith:2", n_train=400, batch_size=32, eval_n=0, threads=2, report=False)
    sft.train(sft.Config(model="gpt-micro", steps=150, out_dir=str(out / "teacher"), **common))
    sft.train(sft.Config(model="gpt-nano", steps=40, out_dir=str(out / "student"), **common))
    return out / "teacher" / "final", out / "student" / "final"


def test_distill_moves_the_student_towards_the_teacher(teacher_and_student, tmp_path):
    from mirl.recipes import distill

    teacher, student = teacher_and_student
    cfg = distill.Config(
        model=str(student), teacher=str(teacher), task="arith:2", steps=150, prompts_per_step=32, lr=2e-3,
        max_new_tokens=16, eval_n=200, threads=2, report=False, out_dir=str(tmp_path / "d"),
    )  # fmt: skip
    res = distill.train(cfg)
    h = res.history
    first = sum(r["divergence"] for r in h[:10]) / 10
    last = sum(r["divergence"] for r in h[-10:]) / 10
    assert last < 0.7 * first, (first, last)  # the divergence to the teacher on the student's own samples falls
    before, after = res.summary["evals"][0]["accuracy"], res.summary["evals"][-1]["accuracy"]
    teacher_acc = res.summary["teacher_evals"][0]["accuracy"]
    # held-out greedy accuracy on 200 distinct prompts, seeds 0-3 (AMD EPYC, AVX2, 2026-12-03): 0.020 -> 0.185,
    # 0.015 -> 0.275, 0.010 -> 0.115, 0.010 -> 0.050 (teacher 0.315-0.425; divergence 3.2-3.6 -> 0.23-0.40, a
    # ratio of 0.07-0.12). Asserted: half the smallest gain (0.04 -> 0.02) and the divergence at 0.7 of its start
    assert after >= before + 0.02 and teacher_acc > before, (before, after, teacher_acc)


def test_distill_with_images_and_bad_input(tmp_path):
    from mirl.options import ConfigError
    from mirl.recipes import distill

    common = dict(steps=2, prompts_per_step=4, max_new_tokens=6, eval_n=0, threads=1, report=False)
    res = distill.train(
        distill.Config(model="vlm-nano", teacher="vlm-micro", task="shapes", out_dir=str(tmp_path / "v"), **common)
    )
    assert len(res.history) == 2 and all(math.isfinite(r["divergence"]) for r in res.history)
    with pytest.raises(ConfigError, match="--teacher is required"):
        distill.train(distill.Config(task="arith:1", out_dir=str(tmp_path / "a"), **common))
    with pytest.raises(ConfigError, match="both take images"):
        distill.train(distill.Config(teacher="vlm-nano", task="arith:1", out_dir=str(tmp_path / "b"), **common))
    with pytest.raises(ConfigError, match="--jsd-beta"):
        distill.train(distill.Config(teacher="gpt-micro", jsd_beta=2.0, out_dir=str(tmp_path / "c"), **common))
