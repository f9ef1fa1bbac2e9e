"""How an actor turns its policy's output into env actions, and what it stores in replay.

Place in the data flow: actors/actor.py asks `act` once per vector step; the stored
actions go into the n-step adder and replay, the env actions into `env.step`.
- Discrete (DQN): epsilon-greedy on the Q-values, with the Ape-X epsilon ladder across
  every actor's sub-envs; stored and env actions are the same int64 indices.
- Box (TD3): the deterministic policy plus Gaussian noise (`actors.action_noise`),
  clipped to [-1, 1]; replay stores the action in [-1, 1]^d, the env receives it scaled
  to its own bounds, so the learner never needs to know them.
- Box (SAC): a draw from the squashed-Gaussian policy itself, already in [-1, 1]^d (its
  own randomness is the exploration: no added noise), stored and scaled as TD3's.
- On-policy (ppo, impala): actions drawn from the policy's distribution (`sample`), with
  their log-probabilities for the learner's importance ratios.
Before the first policy version arrives, off-policy actors act uniformly at random.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from canopy.actors.policy import SquashedGaussianPolicy, env_action, epsilon_ladder


class Explorer:
    """Example:
    explorer = Explorer(env.single_action_space, num_envs=8, rng=rng, epsilons=eps)
    stored, env_actions = explorer.act(policy, obs)
    """

    def __init__(
        self,
        space: gym.Space,
        num_envs: int,
        rng: np.random.Generator,
        epsilons: np.ndarray | None = None,
        noise: float = 0.1,
    ):
        self.space, self.n, self.rng, self.noise = space, num_envs, rng, noise
        if isinstance(space, gym.spaces.Discrete):
            self.epsilons = epsilons if epsilons is not None else np.full(num_envs, 0.05)
        elif isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and np.isfinite(space.low).all():
            self.low = space.low.astype(np.float32)
            self.span = (space.high - space.low).astype(np.float32)
        else:
            raise ValueError(f"actors cannot act in {space}: use a Discrete or a bounded 1-D Box space")

    @property
    def discrete(self) -> bool:
        """Discrete actions (epsilon-greedy) rather than a Box (Gaussian noise)."""
        return isinstance(self.space, gym.spaces.Discrete)

    def act(self, policy, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(actions to store, actions for `env.step`), one per sub-env."""
        if self.discrete:
            actions = self.rng.integers(self.space.n, size=self.n)
            if policy is not None:
                greedy = policy.q_values(obs).argmax(axis=1)
                actions = np.where(self.rng.random(self.n) < self.epsilons, actions, greedy)
            return actions, actions
        d = self.space.shape[0]
        if policy is None:
            stored = self.rng.uniform(-1, 1, size=(self.n, d)).astype(np.float32)
        elif isinstance(policy, SquashedGaussianPolicy):  # sac: the policy explores by itself
            stored = policy.sample(obs, self.rng)[0]
        else:
            noisy = policy.actions(obs) + self.rng.normal(0, self.noise, size=(self.n, d))
            stored = np.clip(noisy, -1, 1).astype(np.float32)
        return stored, self.to_env(stored)

    def sample(self, policy, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """On-policy acting (ppo, impala): (actions to store, actions for `env.step`, their
        log-probabilities), drawn from the policy's own distribution, no epsilon or noise.
        Box: the raw Gaussian sample is stored (its log-probability is the behaviour
        policy's), the env receives it clipped to [-1, 1] and scaled to its bounds."""
        actions, logp = policy.sample(obs, self.rng)
        if self.discrete:
            return actions, actions, logp
        return actions, self.to_env(env_action(actions).astype(np.float32)), logp

    def greedy(self, policy, obs: np.ndarray) -> np.ndarray:
        """The evaluator's actions: no exploration at all."""
        if self.discrete:
            return policy.q_values(obs).argmax(axis=1)
        return self.to_env(policy.actions(obs).astype(np.float32))

    def to_env(self, a: np.ndarray) -> np.ndarray:
        """Actions in [-1, 1]^d scaled to the env's Box bounds."""
        return self.low + (a + 1) * 0.5 * self.span


def ladder(ident: int, num_envs: int, actors: int, base: float, alpha: float) -> np.ndarray:
    """This actor's slice of the Ape-X epsilon ladder over every actor's sub-envs."""
    slots = actors * num_envs
    return np.array([epsilon_ladder(ident * num_envs + j, slots, base, alpha) for j in range(num_envs)])


def initial_priorities(policy, chunk: dict[str, np.ndarray], floor: float = 1e-3) -> np.ndarray:
    """Ape-X: priorities for new transitions, computed where they are made.

    |R + discount * max_a Q(s', a) - Q(s, a)| with the actor's copy of the online network
    (actors hold no target network; Horgan et al. 2018 do the same). Without this, new
    items enter at the largest priority seen, and thousands of actors flood the learner
    with "urgent" items it must sample before it knows better.
    """
    q = policy.q_values(chunk["obs"])
    q_next = policy.q_values(chunk["next_obs"]).max(axis=1)
    taken = q[np.arange(len(q)), chunk["action"]]
    target = chunk["reward"] + chunk["discount"] * q_next
    return np.abs(target - taken).astype(np.float64) + floor
