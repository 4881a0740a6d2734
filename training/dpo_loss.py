"""The Softmax-DPO loss (S-DPO): one chosen response against a set of rejected ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float,
                     rejected_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Softmax-DPO loss over a batch of one chosen vs N rejected responses, and its metrics.

    With the implicit reward r(y) = log pi(y|x) - log pi_ref(y|x) (summed sequence log-probs)::

        L = -mean_b log sigmoid( -logsumexp_j( beta * (r(y_l_j) - r(y_w)) ) )

    With N = 1 this is the standard DPO loss -log sigmoid(beta * (r(y_w) - r(y_l))); when the policy
    equals the reference it is log(1 + N).

    Args:
        policy_chosen, ref_chosen: [B] log-probs of the chosen response under the policy / reference.
        policy_rejected, ref_rejected: [B, N] log-probs of the rejected responses.
        beta: temperature of the implicit reward.
        rejected_mask: optional [B, N] bool, True where a rejected entry is real; False entries (padding)
            are left out of the logsumexp and the metrics. Every row needs at least one True entry.

    Returns:
        (scalar loss, metrics) where metrics (floats, beta-scaled rewards as in TRL) are
        ``reward_margin`` (chosen reward minus the mean rejected reward, batch mean), ``reward_accuracy``
        (fraction of rows whose chosen reward is above every rejected one), ``chosen_reward`` and
        ``rejected_reward`` (batch means).
    """
    if policy_chosen.dim() != 1 or policy_chosen.shape != ref_chosen.shape:
        raise ValueError(f"softmax_dpo_loss: chosen log-probs must both be [B], got {tuple(policy_chosen.shape)} "
                         f"and {tuple(ref_chosen.shape)}")
    batch = policy_chosen.shape[0]
    if (policy_rejected.dim() != 2 or policy_rejected.shape[0] != batch
            or policy_rejected.shape != ref_rejected.shape):
        raise ValueError(f"softmax_dpo_loss: rejected log-probs must both be [B={batch}, N], got "
                         f"{tuple(policy_rejected.shape)} and {tuple(ref_rejected.shape)}")
    if rejected_mask is None:
        mask = torch.ones_like(policy_rejected, dtype=torch.bool)
    else:
        if rejected_mask.shape != policy_rejected.shape:
            raise ValueError(f"softmax_dpo_loss: rejected_mask must be {tuple(policy_rejected.shape)}, "
                             f"got {tuple(rejected_mask.shape)}")
        mask = rejected_mask.to(device=policy_rejected.device, dtype=torch.bool)
        empty = (~mask.any(dim=1)).nonzero().flatten()
        if len(empty):
            raise ValueError(f"softmax_dpo_loss: rows {empty.tolist()[:10]} have no unmasked rejected entry; "
                             "every row needs at least one")

    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    # torch.where (not multiplication) so that padding holding inf or nan cannot reach the loss or its gradient.
    logits = torch.where(mask, rejected_reward - chosen_reward[:, None], torch.full_like(rejected_reward, -torch.inf))
    loss = -F.logsigmoid(-torch.logsumexp(logits, dim=1)).mean()

    with torch.no_grad():
        count = mask.sum(dim=1)
        rejected_mean = torch.where(mask, rejected_reward, torch.zeros_like(rejected_reward)).sum(dim=1) / count
        rejected_max = torch.where(mask, rejected_reward, torch.full_like(rejected_reward, -torch.inf)).amax(dim=1)
        metrics = {
            "reward_margin": (chosen_reward - rejected_mean).mean().item(),
            "reward_accuracy": (chosen_reward > rejected_max).float().mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "rejected_reward": rejected_mean.mean().item(),
        }
    return loss, metrics
