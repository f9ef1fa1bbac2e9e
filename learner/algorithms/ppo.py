"""PPO (Schulman et al. 2017): clipped-surrogate policy optimization on unrolls from a queue.

Each `update` takes one batch of B unrolls of T steps (actors/unroll.py), read once from the
replay queue table, and makes `epochs` passes over its real steps in minibatches:

    A_t  = GAE(lambda) from V of the batch as it came (learner/algorithms/advantages.py),
           normalized over the batch; returns R_t = A_t + V(s_t)
    r_t  = pi(a_t|s_t) / mu(a_t|s_t), mu the behaviour policy that acted (its log-prob
           travels in the unroll)
    L    = -mean(min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t))
           + vf_coef * mean((V(s_t) - R_t)^2) - ent_coef * mean(entropy)

Actors keep acting while the learner trains, so mu may be a version or two older than the
network that started the update: the ratio measures against mu itself, never against a
policy assumed to be the learner's (the learner reports the lag per unroll). The step size
and the clip range anneal linearly to `lr_final` and `clip_range_final` over
`lr_anneal_updates` updates, then stay.

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
from canopy.learner.algorithms.advantages import discounts_of, gae
from canopy.learner.algorithms.base import (
    Built,
    Stats,
    Unrolls,
)


class PPO(OnPolicyLearner):
    """Example:
    algo = PPO(ActorCritic(4, 2, [64, 64], discrete=True), cfg.learner)
    stats = algo.update(unrolls)  # {'loss': ..., 'approx_kl': ..., 'clip_fraction': ...}
    """

    report_every = 1  # an update is a whole PPO iteration: report each

    def schedule(self) -> tuple[float, float]:
        """(step size, clip range) for the next update, linear in the updates made so far."""
        cfg = self.cfg
        frac = min(1.0, self.updates / cfg.lr_anneal_updates) if cfg.lr_anneal_updates > 0 else 0.0
        lr = cfg.lr + (min(cfg.lr_final, cfg.lr) - cfg.lr) * frac
        return lr, cfg.clip_range + (cfg.clip_range_final - cfg.clip_range) * frac

    def update(self, batch: Unrolls) -> Stats:
        """`epochs` passes over the batch's real steps in minibatches, one optimizer step each."""
        cfg, net = self.cfg, self.online
        lr, clip = self.schedule()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mask = batch.mask
        with torch.no_grad():
            values = values_of(net, batch.obs)  # [B, T + 1]: the last column bootstraps
            # gamma, but 0 after a termination and on padding: a truncated unroll's last step
            # bootstraps from V(obs[L]), the true final observation; a terminated one does not.
            discounts = discounts_of(cfg.gamma, batch.terminated, mask)
            advantages, returns = gae(discounts, batch.reward, values, mask, cfg.gae_lambda)
            advantages = normalized(advantages, mask)
        real = steps(mask).bool()  # padding after a truncation takes no part
        data = {
            "obs": steps(batch.obs[:, :-1])[real],
            "action": steps(batch.action)[real],
            "logp": steps(batch.logp)[real],
            "advantage": steps(advantages)[real],
            "return": steps(returns)[real],
            "value": steps(values[:, :-1])[real],
        }
        # A fixed number of minibatches (from the batch's size, not its real steps): every
        # rank of a learner group then makes the same number of steps, and all-reduces.
        parts = max(1, -(-real.numel() // cfg.minibatch_size))
        stats: Stats = {}
        for _ in range(cfg.epochs):
            order = torch.randperm(len(data["obs"]), device=mask.device)
            for idx in torch.tensor_split(order, parts):
                stats = self._step({k: v[idx] for k, v in data.items()}, clip)
        self.updates += 1
        return {**stats, "lr": torch.tensor(lr), "clip_range": torch.tensor(clip)}

    def _step(self, mb: dict[str, torch.Tensor], clip: float) -> Stats:
        net, cfg = self.online, self.cfg
        dist = net.dist(mb["obs"])
        logp = net.log_prob(dist, mb["action"])
        log_ratio = logp - mb["logp"]
        ratio = log_ratio.exp()
        adv = mb["advantage"]
        # The pessimistic bound: past 1 +- clip the ratio earns nothing more, so one batch
        # cannot move the policy far from the one that collected it.
        pg_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
        v = net.value_of(mb["obs"])
        v_err = (v - mb["return"]) ** 2
        if cfg.value_clip > 0:  # the same trust region for the value: the worse of the two errors
            v_clipped = mb["value"] + (v - mb["value"]).clamp(-cfg.value_clip, cfg.value_clip)
            v_err = torch.max(v_err, (v_clipped - mb["return"]) ** 2)
        v_loss = v_err.mean()
        entropy = net.entropy(dist).mean()
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(net.parameters())
        nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            # (r - 1) - log r >= 0: an unbiased, low-variance estimate of KL(mu || pi).
            approx_kl = ((ratio - 1) - log_ratio).mean()
            clipped = ((ratio - 1).abs() > clip).float().mean()
        return {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": entropy.detach(),
            "approx_kl": approx_kl,
            "clip_fraction": clipped,
            "value_mean": v.detach().mean(),
        }


def build(spec: EnvSpec, cfg: LearnerConfig, device: torch.device) -> Built:
    """A PPO for a Discrete (categorical) or Box (Gaussian) env on `device`."""
    net = build_net("ppo", spec, cfg, device)
    return Built(PPO(net, cfg), net.arch)
