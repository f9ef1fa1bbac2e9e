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
- Recurrent (r2d2's `lstm_q`): epsilon-greedy as DQN's, on Q-values from the recurrent
  state the explorer carries per sub-env (made on the first recurrent policy it sees; the
  acting loop calls `stepped` after each env step so the state restarts with each episode).
Before the first policy version arrives, off-policy actors act uniformly at random.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from canopy.actors.policy import (
    LSTMQPolicy,
    RecurrentState,
    SquashedGaussianPolicy,
    env_action,
    epsilon_ladder,
)


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
        self.carry: RecurrentState | None = None  # a recurrent policy's state per sub-env
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
                greedy = self.q_values(policy, obs).argmax(axis=1)
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
            return self.q_values(policy, obs).argmax(axis=1)
        return self.to_env(policy.actions(obs).astype(np.float32))

    def q_values(self, policy, obs: np.ndarray) -> np.ndarray:
        """The policy's Q-values; a recurrent policy's from the carried state, moved one step on."""
        if not isinstance(policy, LSTMQPolicy):
            return policy.q_values(obs)
        if self.carry is None:
            self.carry = RecurrentState(self.n, policy.state_size)
        return self.carry.q_values(policy, obs)

    def stepped(self, terminated: np.ndarray, truncated: np.ndarray) -> None:
        """After each env step: a recurrent state restarts where an episode starts."""
        if self.carry is not None:
            self.carry.stepped(terminated, truncated)

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


# ---- r2d2: priorities of new sequences (actors/sequence.py), Kapturowski et al. 2019 ------------
PRIORITY_ETA = 0.9  # a sequence's priority: eta * max |TD| + (1 - eta) * mean |TD| over its learned steps
RESCALE_EPS = 1e-3  # epsilon of the value rescaling h


def rescale(x: np.ndarray, eps: float = RESCALE_EPS) -> np.ndarray:
    """h(x) = sign(x) (sqrt(|x| + 1) - 1) + eps x: the space r2d2's Q-values live in."""
    return np.sign(x) * (np.sqrt(np.abs(x) + 1) - 1) + eps * x


def unrescale(x: np.ndarray, eps: float = RESCALE_EPS) -> np.ndarray:
    """h^-1(x) = sign(x) (((sqrt(1 + 4 eps (|x| + 1 + eps)) - 1) / (2 eps))^2 - 1)."""
    root = (np.sqrt(1 + 4 * eps * (np.abs(x) + 1 + eps)) - 1) / (2 * eps)
    return np.sign(x) * (root * root - 1)


def learned_steps(mask: np.ndarray, fresh: np.ndarray, burn_in: int) -> np.ndarray:
    """[B, T] 1 where the learner learns: real steps past the burn-in (from step 0 in a
    sequence that starts an episode: its stored state is the true, zero one)."""
    after = np.arange(mask.shape[1])[None, :] >= burn_in
    return mask * np.logical_or(after, fresh[:, None] > 0)


def sequence_td(q, q_target, chunk: dict[str, np.ndarray], n_step: int, gamma: float) -> np.ndarray:
    """[B, T] TD errors in the rescaled space of n-step double-Q targets inside each sequence
    (learner/algorithms/r2d2.py `targets` is the torch twin): q, q_target [B, T + 1, A]."""
    action, reward, mask = chunk["action"], chunk["reward"], chunk["mask"]
    b, t = action.shape
    length = mask.sum(axis=1).astype(np.int64)[:, None]
    steps = np.arange(t)[None, :]
    boot = np.minimum(steps + n_step, length)  # the step each target bootstraps from
    padded = np.concatenate([reward, np.zeros((b, n_step), reward.dtype)], axis=1)
    returns = sum(gamma**j * padded[:, j : j + t] for j in range(n_step))
    ends = (boot == length) & (chunk["terminated"].max(axis=1, keepdims=True) > 0)
    discount = np.where(ends, 0.0, gamma ** np.maximum(boot - steps, 0))
    rows = np.arange(b)[:, None]
    best = q[rows, boot].argmax(axis=2)
    target = rescale(returns + discount * unrescale(q_target[rows, boot, best]))
    return target - q[rows, steps, action]


def priority_mix(td: np.ndarray, learned: np.ndarray, eta: float = PRIORITY_ETA) -> np.ndarray:
    """[B] eta * max + (1 - eta) * mean of |td| over each sequence's learned steps."""
    err = np.abs(td) * learned
    mean = err.sum(axis=1) / np.maximum(learned.sum(axis=1), 1)
    return eta * err.max(axis=1) + (1 - eta) * mean


def sequence_priorities(
    policy: LSTMQPolicy,
    chunk: dict[str, np.ndarray],
    n_step: int,
    gamma: float,
    burn_in: int,
    floor: float = 1e-3,
) -> np.ndarray:
    """Initial priorities of new sequences, Ape-X style: the actor's copy of the online network
    unrolled from each stored state stands in for the learner's online and target networks."""
    q = policy.unroll(chunk["obs"], chunk["h0"], chunk["c0"])
    td = sequence_td(q, q, chunk, n_step, gamma)
    learned = learned_steps(chunk["mask"], chunk["fresh"], burn_in)
    return priority_mix(td, learned).astype(np.float64) + floor
