"""actors/adder.py: vector-env steps -> n-step transitions, in both gymnasium autoreset modes.

Two kinds of input: hand-built step sequences (exact expected values), and real
gymnasium vector envs (a deterministic Ticker env registered here, whose observations
name their episode and time step, and CartPole-v1, whose dynamics make one-step
transitions checkable for continuity).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from canopy.actors.adder import FIELDS, NStepAdder

NEXT, SAME = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP
MODES = [pytest.param(NEXT, id="next-step"), pytest.param(SAME, id="same-step")]


# ---------------------------------------------------------------------------------------
# Hand-built sequences: one sub-env unless a test says otherwise.


def o(value: float, width: int = 2) -> np.ndarray:
    """An observation row whose entries all equal `value` (easy to identify)."""
    return np.full(width, value, dtype=np.float32)


class Driver:
    """Feeds hand-built steps of a single sub-env to an adder, tracking obs like an actor."""

    def __init__(self, adder: NStepAdder, first_obs: float):
        self.adder = adder
        self.obs = np.stack([o(first_obs)])

    def step(
        self,
        next_obs: float,
        reward: float,
        action: int = 0,
        terminated: bool = False,
        truncated: bool = False,
        final_obs: float | None = None,
        version: int = 0,
    ) -> None:
        nxt = np.stack([o(next_obs)])
        info = {}
        if final_obs is not None:
            final = np.empty(1, dtype=object)
            final[0] = o(final_obs)
            info = {"final_obs": final, "_final_obs": np.array([True])}
        self.adder.add(
            self.obs,
            np.array([action]),
            np.array([reward], dtype=np.float32),
            nxt,
            np.array([terminated]),
            np.array([truncated]),
            info,
            version,
        )
        self.obs = nxt


def take_all(adder: NStepAdder) -> list[dict]:
    """Every ready transition as a dict of scalars/arrays, oldest first."""
    if not adder.ready:
        return []
    chunk = adder.take(len(adder.ready))
    assert chunk is not None
    return [{k: chunk[k][i] for k in FIELDS} for i in range(len(chunk["obs"]))]


def obs_id(row: np.ndarray) -> float:
    return float(row[0])


def test_no_transition_is_ready_before_n_steps_have_been_seen() -> None:
    adder = NStepAdder(num_envs=1, n_step=3, gamma=0.5, mode=NEXT)
    d = Driver(adder, 0)
    d.step(1, reward=1.0)
    d.step(2, reward=2.0)
    assert adder.ready == []
    assert adder.take(1) is None


def test_n_step_return_and_discount_are_gamma_weighted_over_the_window() -> None:
    g = 0.5
    adder = NStepAdder(num_envs=1, n_step=3, gamma=g, mode=NEXT)
    d = Driver(adder, 0)
    for t, r in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        d.step(t, reward=r, action=t % 2)

    got = take_all(adder)
    assert [(obs_id(x["obs"]), obs_id(x["next_obs"])) for x in got] == [(0, 3), (1, 4)]
    assert got[0]["reward"] == pytest.approx(1 + g * 2 + g**2 * 3)
    assert got[1]["reward"] == pytest.approx(2 + g * 3 + g**2 * 4)
    assert [x["discount"] for x in got] == pytest.approx([g**3, g**3])
    assert [x["action"] for x in got] == [1, 0]


def test_one_step_adder_emits_every_step_with_discount_gamma() -> None:
    g = 0.9
    adder = NStepAdder(num_envs=1, n_step=1, gamma=g, mode=NEXT)
    d = Driver(adder, 0)
    d.step(1, reward=5.0)
    d.step(2, reward=-1.0)
    got = take_all(adder)
    assert [(obs_id(x["obs"]), obs_id(x["next_obs"]), x["reward"]) for x in got] == [
        (0, 1, 5.0),
        (1, 2, -1.0),
    ]
    assert [x["discount"] for x in got] == pytest.approx([g, g])


def test_termination_flushes_the_window_with_discount_zero_and_the_final_observation() -> None:
    g = 0.5
    adder = NStepAdder(num_envs=1, n_step=3, gamma=g, mode=NEXT)
    d = Driver(adder, 0)
    d.step(1, reward=1.0)
    d.step(2, reward=2.0)
    d.step(3, reward=4.0, terminated=True)

    got = take_all(adder)
    assert [obs_id(x["obs"]) for x in got] == [0, 1, 2]
    assert all(obs_id(x["next_obs"]) == 3 for x in got)
    assert [x["discount"] for x in got] == [0.0, 0.0, 0.0]
    assert [x["reward"] for x in got] == pytest.approx([1 + g * 2 + g**2 * 4, 2 + g * 4, 4])


def test_truncation_bootstraps_but_termination_does_not() -> None:
    g = 0.5

    def episode(**end: bool) -> list[dict]:
        adder = NStepAdder(num_envs=1, n_step=3, gamma=g, mode=NEXT)
        d = Driver(adder, 0)
        d.step(1, reward=1.0)
        d.step(2, reward=1.0, **end)
        return take_all(adder)

    truncated, terminated = episode(truncated=True), episode(terminated=True)

    # The last two steps before a time limit: returns over what is left, discount g^k.
    assert [x["discount"] for x in truncated] == pytest.approx([g**2, g**1])
    assert [x["reward"] for x in truncated] == pytest.approx([1 + g, 1])
    assert all(obs_id(x["next_obs"]) == 2 for x in truncated)
    assert [x["discount"] for x in terminated] == [0.0, 0.0]
    assert [x["reward"] for x in terminated] == pytest.approx([1 + g, 1])


def test_a_step_both_terminated_and_truncated_counts_as_termination() -> None:
    adder = NStepAdder(num_envs=1, n_step=2, gamma=0.9, mode=NEXT)
    d = Driver(adder, 0)
    d.step(1, reward=1.0, terminated=True, truncated=True)
    (x,) = take_all(adder)
    assert x["discount"] == 0.0


def test_next_step_mode_drops_the_reset_step_after_an_episode_end() -> None:
    g = 0.5
    adder = NStepAdder(num_envs=1, n_step=2, gamma=g, mode=NEXT)
    d = Driver(adder, 0)
    d.step(1, reward=1.0)
    d.step(2, reward=1.0, terminated=True)  # true final obs 2 is returned by this step
    assert len(take_all(adder)) == 2
    # The reset step: the action is ignored, obs 100 is the new episode's first obs.
    d.step(100, reward=0.0, action=1)
    assert adder.ready == []
    d.step(101, reward=3.0)
    d.step(102, reward=5.0)

    got = take_all(adder)
    assert len(got) == 1
    assert (obs_id(got[0]["obs"]), obs_id(got[0]["next_obs"])) == (100, 102)
    assert got[0]["reward"] == pytest.approx(3 + g * 5)


def test_same_step_mode_takes_the_true_final_observation_from_info() -> None:
    adder = NStepAdder(num_envs=1, n_step=2, gamma=0.5, mode=SAME)
    d = Driver(adder, 0)
    d.step(1, reward=1.0)
    # This step returns the *reset* obs 100; the true final obs 2 travels in info.
    d.step(100, reward=1.0, truncated=True, final_obs=2)
    got = take_all(adder)
    assert [obs_id(x["next_obs"]) for x in got] == [2, 2]
    assert [x["discount"] for x in got] == pytest.approx([0.25, 0.5])

    # No step is dropped in SAME_STEP mode: the next episode starts from obs 100 at once.
    d.step(101, reward=7.0)
    d.step(102, reward=7.0)
    got = take_all(adder)
    assert [(obs_id(x["obs"]), obs_id(x["next_obs"])) for x in got] == [(100, 102)]


def test_sub_envs_keep_separate_windows_and_an_end_in_one_does_not_flush_another() -> None:
    g = 0.5
    adder = NStepAdder(num_envs=2, n_step=3, gamma=g, mode=NEXT)
    obs = np.stack([o(0), o(10)])
    for t, (term0, r) in enumerate([(False, 1.0), (True, 2.0)], start=1):
        nxt = np.stack([o(t), o(10 + t)])
        adder.add(
            obs,
            np.array([0, 1]),
            np.array([r, 10 * r]),
            nxt,
            np.array([term0, False]),
            np.array([False, False]),
            {},
            0,
        )
        obs = nxt

    got = take_all(adder)
    assert [obs_id(x["obs"]) for x in got] == [0, 1]  # sub-env 1 has 2 < n steps: none yet
    nxt = np.stack([o(50), o(13)])  # sub-env 0 resets (dropped), sub-env 1 fills its window
    adder.add(obs, np.array([0, 1]), np.array([0.0, 30.0]), nxt, np.zeros(2, bool), np.zeros(2, bool), {}, 0)
    (x,) = take_all(adder)
    assert (obs_id(x["obs"]), obs_id(x["next_obs"])) == (10, 13)
    assert x["reward"] == pytest.approx(10 + g * 20 + g**2 * 30)
    assert x["action"] == 1


def test_each_transition_carries_the_version_of_the_policy_that_chose_its_first_action() -> None:
    adder = NStepAdder(num_envs=1, n_step=2, gamma=0.9, mode=NEXT)
    d = Driver(adder, 0)
    for t in range(1, 5):
        d.step(t, reward=0.0, version=(1 << 32) | (10 * t))
    got = take_all(adder)
    assert [int(x["version"]) for x in got] == [(1 << 32) | 10, (1 << 32) | 20, (1 << 32) | 30]


def test_take_returns_the_oldest_transitions_first_as_typed_columns_and_keeps_the_rest() -> None:
    adder = NStepAdder(num_envs=1, n_step=1, gamma=0.9, mode=NEXT)
    d = Driver(adder, 0)
    for t in range(1, 6):
        d.step(t, reward=float(t), action=t % 2)

    assert adder.take(6) is None
    first = adder.take(2)
    second = adder.take(3)
    assert adder.take(1) is None

    assert first is not None and second is not None
    assert set(first) == set(FIELDS)
    assert first["obs"][:, 0].tolist() == [0, 1]
    assert second["obs"][:, 0].tolist() == [2, 3, 4]
    assert second["reward"].tolist() == [3.0, 4.0, 5.0]
    assert first["obs"].shape == (2, 2)
    dtypes = {k: first[k].dtype for k in FIELDS}
    assert dtypes == {
        "obs": np.float32,
        "action": np.int64,
        "reward": np.float32,
        "next_obs": np.float32,
        "discount": np.float32,
        "version": np.int64,
    }


def test_unsupported_autoreset_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="autoreset"):
        NStepAdder(num_envs=1, n_step=3, gamma=0.99, mode=AutoresetMode.DISABLED)


# ---------------------------------------------------------------------------------------
# A real vector env with deterministic, self-describing observations.

TICKER_ID = "CanopyTest/Ticker-v0"
ACTION_BONUS = 10.0


class TickerEnv(gym.Env):
    """obs = (env uid, episode, t). Episode e of env u lasts 2 + (u + e) % 5 steps; even
    episodes terminate, odd ones are truncated. reward = t_after_step + 10 * action."""

    _uids = itertools.count()

    def __init__(self) -> None:
        self.uid = next(TickerEnv._uids)
        self.observation_space = gym.spaces.Box(0.0, 1e6, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.episode = -1
        self.t = 0

    def length(self, episode: int) -> int:
        return 2 + (self.uid + episode) % 5

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = self.t + ACTION_BONUS * int(action)
        end = self.t >= self.length(self.episode)
        terminated = end and self.episode % 2 == 0
        return self._obs(), reward, terminated, end and not terminated, {}

    def _obs(self) -> np.ndarray:
        return np.array([self.uid, self.episode, self.t], dtype=np.float32)


if TICKER_ID not in gym.registry:
    gym.register(id=TICKER_ID, entry_point=TickerEnv)


@dataclass
class Rollout:
    transitions: list[dict]
    actions: dict[tuple[int, int, int], int]  # (uid, episode, t) -> action taken there
    versions: dict[tuple[int, int, int], int]  # (uid, episode, t) -> version at that step
    lengths: dict[tuple[int, int], int]  # (uid, episode) -> length, for finished episodes
    starts: set[tuple[int, int, int]]  # every (uid, episode, t) an action was really taken at


def ticker_rollout(mode: AutoresetMode, n_step: int, gamma: float, steps: int, num_envs: int = 3) -> Rollout:
    env = gym.make_vec(
        TICKER_ID, num_envs=num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode}
    )
    rng = np.random.default_rng(0)
    adder = NStepAdder(num_envs, n_step, gamma, mode)
    out = Rollout([], {}, {}, {}, set())
    try:
        obs, _ = env.reset(seed=0)
        skip = np.zeros(num_envs, dtype=bool)
        for step in range(steps):
            actions = rng.integers(2, size=num_envs)
            version = 1000 + step
            next_obs, rewards, terminated, truncated, info = env.step(actions)
            for i in range(num_envs):
                if mode is NEXT and skip[i]:
                    continue
                key = tuple(int(v) for v in obs[i])
                out.actions[key] = int(actions[i])
                out.versions[key] = version
                out.starts.add(key)
                if terminated[i] or truncated[i]:
                    final = info["final_obs"][i] if mode is SAME else next_obs[i]
                    out.lengths[(key[0], key[1])] = int(final[2])
            adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, version)
            skip = np.logical_or(terminated, truncated)
            obs = next_obs
            chunk = adder.take(4)
            while chunk is not None:
                out.transitions += [{k: chunk[k][j] for k in FIELDS} for j in range(4)]
                chunk = adder.take(4)
        chunk = adder.take(len(adder.ready)) if adder.ready else None
        if chunk is not None:
            out.transitions += [{k: chunk[k][j] for k in FIELDS} for j in range(len(chunk["obs"]))]
    finally:
        env.close()
    return out


@pytest.mark.parametrize("mode", MODES)
def test_ticker_transitions_never_span_two_episodes_and_match_the_true_n_step_values(
    mode: AutoresetMode,
) -> None:
    n, g = 3, 0.5
    run = ticker_rollout(mode, n_step=n, gamma=g, steps=60)
    assert len(run.transitions) > 100
    ends = {"terminated": 0, "truncated": 0, "short": 0}
    for x in run.transitions:
        uid, ep, t = (int(v) for v in x["obs"])
        n_uid, n_ep, n_t = (int(v) for v in x["next_obs"])
        assert (n_uid, n_ep) == (uid, ep), f"transition spans episodes: {x['obs']} -> {x['next_obs']}"
        k = n_t - t
        assert 1 <= k <= n
        length = run.lengths.get((uid, ep))
        at_end = n_t == length
        assert k == n or at_end, "a window shorter than n must end at the episode's end"
        if at_end and ep % 2 == 0:
            assert x["discount"] == 0.0
            ends["terminated"] += 1
        else:
            assert x["discount"] == pytest.approx(g**k, rel=1e-6)
            ends["truncated" if at_end else "short"] += 1
        expected = sum(g**j * (t + j + 1 + ACTION_BONUS * run.actions[(uid, ep, t + j)]) for j in range(k))
        assert x["reward"] == pytest.approx(expected, rel=1e-5)
        assert x["action"] == run.actions[(uid, ep, t)]
        assert x["version"] == run.versions[(uid, ep, t)]
    assert all(count > 0 for count in ends.values()), ends


@pytest.mark.parametrize("mode", MODES)
def test_ticker_every_real_step_of_a_finished_episode_starts_exactly_one_transition(
    mode: AutoresetMode,
) -> None:
    run = ticker_rollout(mode, n_step=3, gamma=0.9, steps=60)
    starts = [tuple(int(v) for v in x["obs"]) for x in run.transitions]
    assert len(starts) == len(set(starts)), "a step was emitted twice"
    finished = {s for s in run.starts if (s[0], s[1]) in run.lengths}
    assert finished, "the rollout finished no episode"
    assert finished <= set(starts), f"missing transitions for {sorted(finished - set(starts))[:5]}"
    # Nothing is emitted for a step no action was taken at (NEXT_STEP's reset steps, or a
    # final observation used as a start).
    assert set(starts) <= run.starts
    assert all(t < run.lengths.get((u, e), 10**9) for u, e, t in starts)


# ---------------------------------------------------------------------------------------
# CartPole-v1: real dynamics. Euler integration gives x' = x + 0.02 * x_dot and
# theta' = theta + 0.02 * theta_dot for one step, so a one-step transition that spans a
# reset (or used the reset observation as next_obs) breaks this identity.

TAU = 0.02
X_LIMIT, THETA_LIMIT = 2.4, 12 * 2 * np.pi / 360


@dataclass
class CartPoleRun:
    transitions: list[dict]
    real_steps: int  # steps where an action was really taken (NEXT_STEP reset steps excluded)
    terminations: int
    truncations: int  # time-limit ends that were not also terminations


def cartpole_transitions(mode: AutoresetMode, n_step: int, gamma: float, steps: int) -> CartPoleRun:
    num_envs = 4
    env = gym.make_vec(
        "CartPole-v1",
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": mode},
        max_episode_steps=15,  # both truncations and terminations within a short run
    )
    adder = NStepAdder(num_envs, n_step, gamma, mode)
    rng = np.random.default_rng(1)
    real_steps = terminations = truncations = 0
    try:
        obs, _ = env.reset(seed=123)
        skip = np.zeros(num_envs, dtype=bool)
        for _ in range(steps):
            actions = rng.integers(2, size=num_envs)
            next_obs, rewards, terminated, truncated, info = env.step(actions)
            adder.add(obs, actions, rewards, next_obs, terminated, truncated, info, 0)
            real_steps += int((~skip).sum()) if mode is NEXT else num_envs
            terminations += int(terminated.sum())
            truncations += int((truncated & ~terminated).sum())
            skip = np.logical_or(terminated, truncated)
            obs = next_obs
    finally:
        env.close()
    chunk = adder.take(len(adder.ready))
    assert chunk is not None
    transitions = [{k: chunk[k][j] for k in FIELDS} for j in range(len(chunk["obs"]))]
    return CartPoleRun(transitions, real_steps, terminations, truncations)


@pytest.mark.parametrize("mode", MODES)
def test_cartpole_one_step_transitions_follow_the_dynamics_and_terminals_are_true_final_states(
    mode: AutoresetMode,
) -> None:
    g = 0.99
    run = cartpole_transitions(mode, n_step=1, gamma=g, steps=200)
    assert run.terminations > 0 and run.truncations > 0, "the rollout must exercise both kinds of end"
    assert len(run.transitions) == run.real_steps  # n = 1: every real step, and only those
    terminals = 0
    for x in run.transitions:
        s, s2 = x["obs"].astype(np.float64), x["next_obs"].astype(np.float64)
        np.testing.assert_allclose(s2[0], s[0] + TAU * s[1], atol=1e-5)
        np.testing.assert_allclose(s2[2], s[2] + TAU * s[3], atol=1e-5)
        assert x["reward"] == 1.0
        if x["discount"] == 0.0:
            terminals += 1
            assert abs(s2[0]) > X_LIMIT or abs(s2[2]) > THETA_LIMIT, "terminal next_obs is not a final state"
        else:
            assert x["discount"] == pytest.approx(g)
            assert abs(s2[0]) <= X_LIMIT and abs(s2[2]) <= THETA_LIMIT, "bootstrapping from a final state"
    assert terminals == run.terminations


@pytest.mark.parametrize("mode", MODES)
def test_cartpole_n_step_discounts_and_returns_are_consistent(mode: AutoresetMode) -> None:
    n, g = 3, 0.9
    transitions = cartpole_transitions(mode, n_step=n, gamma=g, steps=200).transitions
    returns_by_k = {k: sum(g**j for j in range(k)) for k in range(1, n + 1)}
    seen_k = set()
    for x in transitions:
        if x["discount"] == 0.0:
            assert any(x["reward"] == pytest.approx(r) for r in returns_by_k.values())
            continue
        (k,) = [k for k in returns_by_k if x["discount"] == pytest.approx(g**k)]
        assert x["reward"] == pytest.approx(returns_by_k[k])
        seen_k.add(k)
    assert n in seen_k and len(seen_k) > 1, "expected full windows and truncation-shortened ones"


def test_a_restarted_frame_adder_starts_every_chain_at_its_current_frame() -> None:
    from canopy.actors.adder import FrameAdder

    rng = np.random.default_rng(0)
    adder = FrameAdder(num_envs=2, n_step=3, gamma=0.9, mode=AutoresetMode.NEXT_STEP, stream=1)
    obs = rng.integers(0, 255, size=(2, 4, 6, 6), dtype=np.uint8)
    for _ in range(5):
        nxt = rng.integers(0, 255, size=(2, 4, 6, 6), dtype=np.uint8)
        adder.add(obs, np.zeros(2, np.int64), np.ones(2), nxt, np.zeros(2, bool), np.zeros(2, bool), {}, 0)
        obs = nxt
    adder.restart(obs)
    for _ in range(4):
        nxt = rng.integers(0, 255, size=(2, 4, 6, 6), dtype=np.uint8)
        adder.add(obs, np.zeros(2, np.int64), np.ones(2), nxt, np.zeros(2, bool), np.zeros(2, bool), {}, 0)
        obs = nxt
    chunk = adder.take(2)
    keys, prevs = chunk["frame_key"].tolist(), chunk["frame_prev"].tolist()
    # The first two frames after the restart open new chains; every later one follows a frame in this chunk.
    assert prevs[:2] == keys[:2]
    assert all(p in keys for p in prevs)
    assert set(chunk["obs"].tolist()) <= set(keys)
