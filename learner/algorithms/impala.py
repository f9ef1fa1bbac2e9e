"""IMPALA (Espeholt et al. 2018): an actor-critic that learns from lagging actors by V-trace.

Each `update` is one gradient step on one batch of B unrolls of T steps (actors/unroll.py),
read once from the replay queue table. The actors' policy mu may be several versions
behind the learner's pi; V-trace corrects for it with truncated importance weights
(learner/algorithms/advantages.py `vtrace`):

    rho_t = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t)),  c_t = min(c_bar, pi / mu)
    v_s   = V(x_s) + sum_t gamma^(t-s) (prod_{s<=i<t} c_i) rho_t delta_t,
            delta_t = r_t + gamma_t V(x_{t+1}) - V(x_t)
    L     = -mean(rho_s (r_s + gamma_s v_{s+1} - V(x_s)) log pi(a_s|x_s))   policy gradient
            + vf_coef * mean((v_s - V(x_s))^2) / 2                           value regression
            - ent_coef * mean(entropy(pi(.|x_s)))                           exploration

gamma_t is 0 after a termination (no bootstrap past the end of an episode) and on padding;
a truncated unroll's last step bootstraps from its true final observation. With pi = mu
(no lag) rho = c = 1 and v_s is the n-step return up to the unroll's end. The policy
gradient's advantages are scaled to unit std over each batch: their scale then does not
depend on the task's rewards.

An `Algorithm` (learner/algorithms/base.py): its optimizer, export and checkpoint state are
`OnPolicyLearner`'s (actor_critic.py), `update` is this file's; `build` at the end is its
registry entry.
"""

from __future__ import annotations

import torch
from torch import nn

from canopy.config import LearnerConfig
from canopy.envs import EnvSpec
from canopy.learner.algorithms.actor_critic import OnPolicyLearner, build_net, normalized, steps, values_of
from canopy.learner.algorithms.advantages import discounts_of, vtrace
from canopy.learner.algorithms.base import (
    Built,
    Stats,
    Unrolls,
)


class IMPALA(OnPolicyLearner):
    """Example:
    algo = IMPALA(ActorCritic(4, 2, [64, 64], discrete=True), cfg.learner)
    stats = algo.update(unrolls)  # {'loss': ..., 'rho_mean': ..., ...}
    """

    report_every = 10  # updates between stats reports

    def update(self, batch: Unrolls) -> Stats:
        """One gradient step on the batch's V-trace losses."""
        cfg, net = self.cfg, self.online
        b, t = batch.reward.shape
        mask = batch.mask
        n = mask.sum().clamp(min=1)
        dist = net.dist(steps(batch.obs[:, :-1]))
        logp = net.log_prob(dist, steps(batch.action)).view(b, t)
        values = values_of(net, batch.obs)  # [B, T + 1], with gradients for the value loss
        discounts = discounts_of(cfg.gamma, batch.terminated, mask)
        # log(pi / mu): the learner's policy now over the one that acted (its log-prob came
        # with the unroll); padding's values are masked out inside vtrace.
        log_rhos = (logp.detach() - batch.logp) * mask
        vs, pg_adv = vtrace(log_rhos, discounts, batch.reward, values.detach(), mask, cfg.rho_bar, cfg.c_bar)
        # Scaled, not centred: a step whose importance weight rho is ~0 (an action the
        # learner's policy no longer takes) must keep its ~0 advantage. Centring would hand
        # every such action the batch's negative mean and push it further down, a feedback
        # loop that collapsed CartPole's policy once actors lagged 16 versions behind.
        pg_adv = normalized(pg_adv, mask, center=False)
        pg_loss = -(logp * pg_adv * mask).sum() / n
        v_loss = 0.5 * (((vs - values[:, :-1]) ** 2) * mask).sum() / n
        entropy = (net.entropy(dist).view(b, t) * mask).sum() / n
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(net.parameters())
        nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        with torch.no_grad():
            # The clipped weight's mean: 1 when the actors were on-policy, lower as they lag
            # (the unclipped ratio's mean is 1 under mu whatever the lag).
            rho = (log_rhos.exp().clamp(max=cfg.rho_bar) * mask).sum() / n
        return {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": entropy.detach(),
            "rho_clipped_mean": rho,
            "value_mean": (values[:, :-1].detach() * mask).sum() / n,
        }


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """An IMPALA for a Discrete (categorical) or Box (Gaussian) env on `device`."""
    net = build_net("impala", spec, cfg, device)
    return Built(IMPALA(net, cfg), net.arch)
