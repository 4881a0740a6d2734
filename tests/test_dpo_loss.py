"""Softmax-DPO loss: the DPO special case, the uniform case, gradients, masking, and a few training steps."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from training.dpo_loss import softmax_dpo_loss

torch.set_num_threads(1)


def random_logps(batch: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(batch, generator=g) * 10, -torch.rand(batch, n, generator=g) * 10,
            -torch.rand(batch, generator=g) * 10, -torch.rand(batch, n, generator=g) * 10)


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_one_rejected_is_the_standard_dpo_loss(beta):
    pc, pr, rc, rr = random_logps(16, 1, seed=int(beta * 10))
    loss, _ = softmax_dpo_loss(pc, pr, rc, rr, beta)
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr[:, 0] - rr[:, 0]))).mean()
    torch.testing.assert_close(loss, dpo)


@pytest.mark.parametrize("n", [1, 3, 20])
def test_policy_equal_to_reference_gives_log_one_plus_n(n):
    pc, pr, _, _ = random_logps(8, n)
    loss, metrics = softmax_dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=2.0)
    assert loss.item() == pytest.approx(math.log(1 + n), rel=1e-6)
    assert metrics["reward_margin"] == 0.0 and metrics["reward_accuracy"] == 0.0


def test_raising_the_chosen_log_prob_lowers_the_loss():
    pc, pr, rc, rr = random_logps(4, 5)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    loss, _ = softmax_dpo_loss(pc, pr, rc, rr, beta=1.0)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    higher, _ = softmax_dpo_loss(pc.detach() + 0.5, pr.detach(), rc, rr, beta=1.0)
    assert higher < loss


def test_masking_equals_dropping_the_masked_columns_and_ignores_their_values():
    pc, pr, rc, rr = random_logps(3, 4)
    mask = torch.tensor([[True, False, True, True], [True, True, True, True], [False, False, True, False]])
    pr_padded = torch.where(mask, pr, torch.full_like(pr, float("nan")))
    pr_padded.requires_grad_(True)
    loss, metrics = softmax_dpo_loss(pc, pr_padded, rc, rr, beta=0.7, rejected_mask=mask)
    loss.backward()
    assert torch.isfinite(pr_padded.grad).all() and (pr_padded.grad[~mask] == 0).all()
    rows = [softmax_dpo_loss(pc[i:i + 1], pr[i:i + 1, mask[i]], rc[i:i + 1], rr[i:i + 1, mask[i]], beta=0.7)
            for i in range(3)]
    torch.testing.assert_close(loss, torch.stack([r[0] for r in rows]).mean())
    assert metrics["reward_margin"] == pytest.approx(sum(r[1]["reward_margin"] for r in rows) / 3, rel=1e-5)


def test_row_without_any_rejected_entry_is_an_error():
    pc, pr, rc, rr = random_logps(2, 3)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="rows \\[1\\] have no unmasked rejected entry"):
        softmax_dpo_loss(pc, pr, rc, rr, 1.0, rejected_mask=mask)
    with pytest.raises(ValueError, match="rejected log-probs must both be"):
        softmax_dpo_loss(pc, pr[:, :2], rc, rr, 1.0)


def test_extreme_rewards_stay_finite():
    pc = torch.tensor([0.0, -1e4])
    pr = torch.tensor([[-1e4, -1e4], [0.0, 0.0]])
    loss, metrics = softmax_dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2, 2), beta=10.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.5 * (1e5 + math.log(2)), rel=1e-6)
    assert metrics["reward_accuracy"] == 0.5


def sequence_logps(model, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each response [B, R] after its prompt [B, P] (teacher forcing)."""
    tokens = torch.cat([prompts, responses], dim=1)
    logits = model(input_ids=tokens).logits[:, prompts.shape[1] - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1).sum(-1)


def test_a_few_adam_steps_on_a_tiny_qwen2_lower_the_loss():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    policy = Qwen2ForCausalLM(config)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    batch, n, length = 4, 3, 4  # each response is a 4-token "SCID"
    prompts = torch.randint(0, 40, (batch, 5))
    chosen = torch.randint(0, 40, (batch, length))
    rejected = torch.randint(0, 40, (batch, n, length))
    prompts_rep = prompts.repeat_interleave(n, dim=0)

    def loss_now():
        pc = sequence_logps(policy, prompts, chosen)
        pr = sequence_logps(policy, prompts_rep, rejected.reshape(batch * n, length)).reshape(batch, n)
        with torch.no_grad():
            rc = sequence_logps(reference, prompts, chosen)
            rr = sequence_logps(reference, prompts_rep, rejected.reshape(batch * n, length)).reshape(batch, n)
        return softmax_dpo_loss(pc, pr, rc, rr, beta=0.5)

    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    first, _ = loss_now()
    assert first.item() == pytest.approx(math.log(1 + n), rel=1e-5)  # policy == reference at the start
    for _ in range(8):
        loss, _ = loss_now()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, metrics = loss_now()
    assert last.item() < 0.5 * first.item()
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] == 1.0
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters()))
