"""Value targets and advantages of on-policy unrolls: V-trace (IMPALA) and GAE (PPO).

Place in the data flow: unrolls from actors/unroll.py, sampled from a replay queue table
-> the learner's value network gives `values` [B, T + 1] (V of obs[0..T], obs[L] being each
unroll's bootstrap observation) -> these functions -> the losses of the on-policy
algorithms. Shapes are [B, T] throughout, batch first; the recursions run backwards over T.

`discounts` carries the episode structure: gamma * (1 - terminated) * mask. A termination
(discount 0) stops both the bootstrap and the recursion, so an unroll may hold the end of
one episode and the start of the next; a truncation is the last real step of its unroll
and keeps gamma, bootstrapping from obs[L]; padding (mask 0) contributes nothing.
"""

from __future__ import annotations

import torch


def vtrace(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace targets v_s [B, T] and policy-gradient advantages [B, T] (Espeholt et al. 2018).

    `log_rhos`: log pi(a_t|x_t) - log mu(a_t|x_t), target policy over behaviour policy.
    """
    with torch.no_grad():
        ratios = torch.exp(log_rhos)
        rho = ratios.clamp(max=rho_bar)  # truncated importance weight of the TD error
        c = ratios.clamp(max=c_bar)  # "trace cutting": how far a correction reaches back
        # delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)), zero on padding
        deltas = mask * rho * (rewards + discounts * values[:, 1:] - values[:, :-1])
        # v_s - V(x_s) = delta_s + gamma_s c_s (v_{s+1} - V(x_{s+1})), from the end backwards;
        # past the last step the correction is 0, so v_T = V(x_T), the bootstrap value.
        correction = torch.zeros_like(values[:, 0])
        corrections = torch.empty_like(deltas)
        for t in range(deltas.shape[1] - 1, -1, -1):
            correction = deltas[:, t] + discounts[:, t] * c[:, t] * correction
            corrections[:, t] = correction
        vs = values[:, :-1] + corrections
        # The policy gradient uses the target of the next state, v_{s+1}; after the last real
        # step that is V(obs[L]) (padding has no correction, so vs there equals the value).
        vs_next = torch.cat([vs[:, 1:], values[:, -1:]], dim=1)
        advantages = mask * rho * (rewards + discounts * vs_next - values[:, :-1])
    return vs, advantages


def gae(
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates [B, T] and the value targets they imply (Schulman et
    al. 2016): A_t = delta_t + gamma_t lambda A_{t+1}, returns = A + V."""
    with torch.no_grad():
        deltas = mask * (rewards + discounts * values[:, 1:] - values[:, :-1])
        advantage = torch.zeros_like(values[:, 0])
        advantages = torch.empty_like(deltas)
        for t in range(deltas.shape[1] - 1, -1, -1):
            advantage = deltas[:, t] + discounts[:, t] * lam * advantage
            advantages[:, t] = advantage
    return advantages, advantages + values[:, :-1]


def discounts_of(gamma: float, terminated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-step discounts of unrolls: gamma, 0 after a termination and on padding."""
    return gamma * (1.0 - terminated) * mask
