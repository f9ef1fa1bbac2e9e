"""The actor's local copy of the policy: the forward pass of published policies in numpy,
Q-networks (`mlp`, `nature_cnn`, the recurrent `lstm_q`) or deterministic and stochastic
policies (`tanh_mlp`, `categorical_mlp`, `gaussian_mlp`, `squashed_gaussian_mlp`; names in
canopy/arch.py).

Actors only ever run inference on small batches, where numpy beats torch's per-op
overhead, and staying torch-free keeps an actor process cheap to start (no 1.5 s import,
~100 MB less memory), which matters at thousands of actors. The weights arrive as named
float32 arrays from the cache tree; every MLP architecture is a stack of linear layers
`layers.<i>.weight/bias` with ReLU between them, whose outputs are Q-values, a tanh's
input, action logits or a Gaussian's mean (which also brings a `log_std` array), or a
Gaussian's mean and log std side by side (sac's squashed Gaussian).
"""

from __future__ import annotations

import itertools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits

from canopy.arch import (
    CATEGORICAL_MLP,
    GAUSSIAN_MLP,
    LOG_STD_MAX,
    LOG_STD_MIN,
    LSTM_Q,
    MLP,
    NATURE_CNN,
    SQUASHED_GAUSSIAN_MLP,
    TANH_MLP,
)
from canopy.errors import ProtocolError


class MLPPolicy:
    """Example:
    policy = MLPPolicy.from_arrays(MLP, arrays)
    q = policy.q_values(obs)  # [batch, actions]

    A hidden layer may carry layer normalization (`layers.<i>.norm_weight/norm_bias`, the
    learner's `learner.layer_norm`): applied to its output before the ReLU, as torch's
    LayerNorm does it (biased variance, epsilon 1e-5).
    """

    LN_EPS = np.float32(1e-5)

    def __init__(
        self,
        layers: list[tuple[np.ndarray, np.ndarray]],
        norms: list[tuple[np.ndarray, np.ndarray] | None] | None = None,
    ):
        self.layers = layers
        self.norms = norms or [None] * len(layers)

    @classmethod
    def from_arrays(cls, arch: str, arrays: dict[str, np.ndarray]) -> MLPPolicy:
        """The policy of a published `mlp`'s arrays; ProtocolError on a bad name or shape."""
        if arch != MLP:
            raise ProtocolError(f"actors cannot run architecture {arch!r}")
        if not arrays:
            raise ProtocolError("an mlp needs weight/bias pairs")
        by_index: dict[int, dict[str, np.ndarray]] = {}
        for name, array in arrays.items():
            prefix, index, kind = [*name.split("."), "", ""][:3]
            if prefix != "layers" or not index.isdigit() or kind not in _MLP_KINDS or name.count(".") != 2:
                raise ProtocolError(f"bad mlp array name {name!r}")
            by_index.setdefault(int(index), {})[kind] = array
        if sorted(by_index) != list(range(len(by_index))):
            raise ProtocolError(f"mlp layers are numbered {sorted(by_index)}, not 0..{len(by_index) - 1}")
        layers, norms = [], []
        for i in range(len(by_index)):
            layer = by_index[i]
            w, b = layer.get("weight"), layer.get("bias")
            if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
                raise ProtocolError(f"bad mlp layer {i}: weight {_shape(w)} / bias {_shape(b)}")
            # No copy: the arrays may be read-only views on the host's shared copy (cache/shm.py),
            # and thousands of actors must not each hold their own. `w.T` is a view too.
            layers.append((np.asarray(w, dtype=np.float32).T, np.asarray(b, dtype=np.float32)))
            g, beta = layer.get("norm_weight"), layer.get("norm_bias")
            if g is None and beta is None:
                norms.append(None)
                continue
            if (
                i == len(by_index) - 1
                or g is None
                or beta is None
                or g.shape != b.shape
                or beta.shape != b.shape
            ):
                raise ProtocolError(f"bad layer norm on mlp layer {i}: {_shape(g)} / {_shape(beta)}")
            norms.append((np.asarray(g, dtype=np.float32), np.asarray(beta, dtype=np.float32)))
        for (w0, _), (w1, _) in itertools.pairwise(layers):
            if w0.shape[1] != w1.shape[0]:
                raise ProtocolError("mlp layer sizes do not chain")
        return cls(layers, norms)

    @property
    def in_features(self) -> int:
        """Size of the flat observation the first layer takes."""
        return self.layers[0][0].shape[0]

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """The network's outputs [batch, outputs] for flattened observations."""
        x = obs.reshape(len(obs), -1).astype(np.float32, copy=False)
        last = len(self.layers) - 1
        for i, ((w, b), norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            x = x @ w + b  # allocates a fresh x: the shared weights are never written
            if norm is not None:
                x -= x.mean(axis=1, keepdims=True)
                x /= np.sqrt((x * x).mean(axis=1, keepdims=True) + self.LN_EPS)
                x *= norm[0]
                x += norm[1]
            if i < last:
                np.maximum(x, 0, out=x)
        return x


_MLP_KINDS = ("weight", "bias", "norm_weight", "norm_bias")


def _shape(a: np.ndarray | None) -> object:
    return None if a is None else a.shape


class TanhMLPPolicy(MLPPolicy):
    """A deterministic continuous policy (td3's actor): the mlp, then tanh, in [-1, 1]^d."""

    def actions(self, obs: np.ndarray) -> np.ndarray:
        """Actions in [-1, 1]^d, one row per observation."""
        return np.tanh(self.q_values(obs))


class CategoricalPolicy(MLPPolicy):
    """A stochastic Discrete policy (ppo, impala): the mlp's outputs are action logits.

    `q_values` returns the logits, so the greedy paths that take its argmax (explore.py's
    `Explorer.greedy`, the evaluator) act with the most probable action unchanged.
    """

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(actions int64 [batch], their log-probabilities float32 [batch]) drawn from softmax(logits)."""
        logp_all = log_softmax(self.q_values(obs))
        # Gumbel-max: argmax(log p + Gumbel noise) is an exact draw from p, vectorized over
        # the batch with no cumulative sums to go wrong at probabilities near 0 or 1.
        actions = (logp_all + rng.gumbel(size=logp_all.shape)).argmax(axis=1)
        logp = np.take_along_axis(logp_all, actions[:, None], axis=1)[:, 0]
        return actions.astype(np.int64), logp.astype(np.float32)


class GaussianPolicy(MLPPolicy):
    """A stochastic Box policy (ppo, impala): a diagonal Gaussian whose mean is the mlp's
    output and whose log standard deviation `log_std` [d] does not depend on the observation.

    Samples are returned unclipped, since the learner needs the log-probability of what was
    drawn; `env_action` clips them into canopy's [-1, 1]^d action box before the env sees them.
    """

    HALF_LOG_2PI = np.float32(0.5 * np.log(2 * np.pi))

    def __init__(
        self,
        layers: list[tuple[np.ndarray, np.ndarray]],
        norms: list[tuple[np.ndarray, np.ndarray] | None] | None,
        log_std: np.ndarray,
    ):
        super().__init__(layers, norms)
        self.log_std = log_std
        self.std = np.exp(log_std)

    @classmethod
    def from_arrays(cls, arch: str, arrays: dict[str, np.ndarray]) -> GaussianPolicy:
        """The policy of a published `gaussian_mlp`'s arrays; ProtocolError on a bad name or shape."""
        if arch != GAUSSIAN_MLP:
            raise ProtocolError(f"a gaussian policy cannot run architecture {arch!r}")
        rest = {k: v for k, v in arrays.items() if k != "log_std"}
        mlp = MLPPolicy.from_arrays(MLP, rest)
        d = mlp.layers[-1][0].shape[1]
        log_std = arrays.get("log_std")
        if log_std is None:
            raise ProtocolError("a gaussian_mlp needs a log_std array")
        if np.shape(log_std) != (d,):
            raise ProtocolError(f"a gaussian_mlp's log_std must have shape ({d},), not {np.shape(log_std)}")
        log_std = np.asarray(log_std, dtype=np.float32)
        if not np.isfinite(log_std).all():
            raise ProtocolError("a gaussian_mlp's log_std holds values that are not finite")
        return cls(mlp.layers, mlp.norms, log_std)

    def actions(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions: the mode (the mean), clipped to [-1, 1]^d like a sampled action."""
        return env_action(self.q_values(obs))

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(raw actions float32 [batch, d], unclipped; their log-densities float32 [batch])."""
        mean = self.q_values(obs)
        raw = mean + self.std * rng.standard_normal(mean.shape, dtype=np.float32)
        # The density of `raw` as the learner computes it (torch's Normal.log_prob), summed
        # over the independent dimensions.
        z = (raw - mean) / self.std
        logp = (-0.5 * z * z - self.log_std - self.HALF_LOG_2PI).sum(axis=1)
        return raw.astype(np.float32, copy=False), logp.astype(np.float32, copy=False)


class SquashedGaussianPolicy(MLPPolicy):
    """A stochastic Box policy for off-policy learning (sac's actor, learner/algorithms/sac.py):
    the mlp's 2d outputs are a Gaussian's mean (first d) and log standard deviation (last d,
    clamped to [LOG_STD_MIN, LOG_STD_MAX] as the learner clamps it); actions are tanh of a
    sample, so they are already in canopy's action box [-1, 1]^d.
    """

    LOG_2 = np.float32(np.log(2.0))

    @classmethod
    def from_arrays(cls, arch: str, arrays: dict[str, np.ndarray]) -> SquashedGaussianPolicy:
        """The policy of a published `squashed_gaussian_mlp`'s arrays; ProtocolError on a bad
        name or shape (the last layer must have an even number of outputs)."""
        if arch != SQUASHED_GAUSSIAN_MLP:
            raise ProtocolError(f"a squashed gaussian policy cannot run architecture {arch!r}")
        mlp = MLPPolicy.from_arrays(MLP, arrays)
        outputs = mlp.layers[-1][0].shape[1]
        if outputs == 0 or outputs % 2:
            raise ProtocolError(
                f"a squashed_gaussian_mlp's last layer needs 2 x d outputs (mean, log std), not {outputs}"
            )
        return cls(mlp.layers, mlp.norms)

    def mean_log_std(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, clamped log std) of the pre-tanh Gaussian, each [batch, d]."""
        out = self.q_values(obs)
        d = out.shape[1] // 2
        return out[:, :d], np.clip(out[:, d:], LOG_STD_MIN, LOG_STD_MAX)

    def actions(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions tanh(mean) in [-1, 1]^d: the evaluator's, `canopy eval`'s and exports'."""
        out = self.q_values(obs)
        return np.tanh(out[:, : out.shape[1] // 2])

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(actions tanh(mean + std * eps) float32 [batch, d] in [-1, 1], their log-probabilities
        float32 [batch] with the tanh correction), eps ~ N(0, I) from `rng`."""
        mean, log_std = self.mean_log_std(obs)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        pre_tanh = mean + np.exp(log_std) * eps
        # As learner/algorithms/sac.py `squashed_log_prob`: log N(x) in terms of eps, minus
        # log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)), finite for every x.
        gaussian = (-0.5 * eps * eps - log_std - GaussianPolicy.HALF_LOG_2PI).sum(axis=1)
        correction = (2 * (self.LOG_2 - pre_tanh - np.logaddexp(0, -2 * pre_tanh))).sum(axis=1)
        actions = np.tanh(pre_tanh)
        return actions.astype(np.float32, copy=False), (gaussian - correction).astype(np.float32, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, stable for large logits (the max is subtracted first)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def env_action(raw: np.ndarray) -> np.ndarray:
    """A Gaussian policy's raw sample or mean clipped into canopy's action box [-1, 1]^d."""
    return np.clip(raw, -1.0, 1.0)


class NatureCNNPolicy:
    """The learner's `nature_cnn` (learner/network.py) forward pass in numpy.

    Convolutions as one matrix product each over strided windows (im2col through
    `sliding_window_view`), which is what BLAS is fast at; for a handful of 4x84x84
    frames per step that is a few milliseconds, no torch needed in the actor.
    """

    CONVS = (("conv.0", 4), ("conv.2", 2), ("conv.4", 1))  # (parameter prefix, stride)
    HEADS = ("head.0", "head.2")

    def __init__(self, arrays: dict[str, np.ndarray]):
        try:
            self.convs = [(arrays[f"{n}.weight"], arrays[f"{n}.bias"], s) for n, s in self.CONVS]
            self.heads = [(arrays[f"{n}.weight"].T, arrays[f"{n}.bias"]) for n in self.HEADS]
        except KeyError as exc:
            raise ProtocolError(f"nature_cnn weights lack {exc}") from None
        for w, b, _ in self.convs:
            if w.ndim != 4 or b.shape != (w.shape[0],):
                raise ProtocolError(f"bad conv layer {w.shape} / {b.shape}")
        if self.heads[0][0].shape[1] != self.heads[1][0].shape[0]:
            raise ProtocolError("nature_cnn head sizes do not chain")

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Q-values [batch, actions] of uint8 frame stacks."""
        x = obs.astype(np.float32) * np.float32(1 / 255)
        for w, b, stride in self.convs:
            out, c, k, _ = w.shape
            win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
            n, _, ho, wo = win.shape[:4]
            cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
            y = cols @ w.reshape(out, c * k * k).T + b
            x = np.maximum(y, 0).reshape(n, ho, wo, out).transpose(0, 3, 1, 2)
        x = x.reshape(len(x), -1)
        (w1, b1), (w2, b2) = self.heads
        return np.maximum(x @ w1 + b1, 0) @ w2 + b2


class LSTMQPolicy:
    """The learner's `lstm_q` (learner/network.py `LSTMQNetwork`) in numpy: linear layers with
    ReLU, one LSTM step, a linear head. The recurrent state is the caller's: `step` takes
    (h, c) and returns the next, so one set of weights serves any number of sub-envs, and
    the state outlives a swap of weights (`RecurrentState` keeps it for an acting loop).

    Example:
        policy = LSTMQPolicy.from_arrays(LSTM_Q, arrays)
        h, c = policy.zero_state(8)
        q, h, c = policy.step(obs, h, c)  # q [8, actions]
    """

    LSTM = ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0")

    def __init__(self, torso: MLPPolicy | None, lstm: list[np.ndarray], head: tuple[np.ndarray, np.ndarray]):
        self.torso = torso
        w_ih, w_hh, b_ih, b_hh = lstm
        self.w_ih, self.w_hh, self.b = w_ih.T, w_hh.T, b_ih + b_hh
        self.head_w, self.head_b = head[0].T, head[1]

    @classmethod
    def from_arrays(cls, arch: str, arrays: dict[str, np.ndarray]) -> LSTMQPolicy:
        """The policy of a published `lstm_q`'s arrays; ProtocolError on a bad name or shape."""
        if arch != LSTM_Q:
            raise ProtocolError(f"an lstm policy cannot run architecture {arch!r}")
        known = {*cls.LSTM, "head.weight", "head.bias"}
        layers = {k: v for k, v in arrays.items() if k not in known}
        missing = sorted(known - set(arrays))
        if missing:
            raise ProtocolError(f"lstm_q arrays lack {', '.join(missing)}")
        torso = MLPPolicy.from_arrays(MLP, layers) if layers else None
        lstm = [np.asarray(arrays[k], dtype=np.float32) for k in cls.LSTM]
        w_ih, w_hh, b_ih, b_hh = lstm
        units = w_hh.shape[1] if w_hh.ndim == 2 else 0
        # The LSTM's input: the torso's last width, else the observation (w_ih's own width).
        inputs = torso.layers[-1][0].shape[1] if torso is not None else (w_ih.shape[-1] if w_ih.ndim else 0)
        if (
            units == 0
            or w_hh.shape != (4 * units, units)
            or w_ih.shape != (4 * units, inputs)
            or b_ih.shape != (4 * units,)
            or b_hh.shape != (4 * units,)
        ):
            raise ProtocolError(f"bad lstm_q lstm: weight_ih {w_ih.shape}, weight_hh {w_hh.shape}")
        w, b = (np.asarray(arrays[k], dtype=np.float32) for k in ("head.weight", "head.bias"))
        if w.ndim != 2 or w.shape[1] != units or b.shape != (w.shape[0],):
            raise ProtocolError(f"bad lstm_q head: weight {w.shape} / bias {b.shape} after {units} units")
        return cls(torso, lstm, (w, b))

    @property
    def state_size(self) -> int:
        """Units of h (and of c)."""
        return self.w_hh.shape[0]

    def zero_state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The state at an episode's start for `n` sub-envs: h = c = 0."""
        return np.zeros((n, self.state_size), np.float32), np.zeros((n, self.state_size), np.float32)

    def step(
        self, obs: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Q-values [n, actions], next h, next c) of one observation per sub-env."""
        x = obs.reshape(len(obs), -1).astype(np.float32, copy=False)
        if self.torso is not None:
            x = np.maximum(self.torso.q_values(x), 0)  # the torso's last layer has its ReLU here
        gates = x @ self.w_ih + h @ self.w_hh + self.b
        i, f, g, o = np.split(gates, 4, axis=1)  # torch's gate order
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        return h @ self.head_w + self.head_b, h, c

    def unroll(self, obs: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Q-values [n, T, actions] of n sequences of observations [n, T, ...] from (h, c)."""
        q = []
        for t in range(obs.shape[1]):
            q_t, h, c = self.step(obs[:, t], h, c)
            q.append(q_t)
        return np.stack(q, axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning for large |x|, unlike 1 / (1 + exp(-x))
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


class RecurrentState:
    """The recurrent state (h, c) of each sub-env of an acting loop, zeroed where an episode starts.

    With NEXT_STEP autoreset (canopy/envs.py), the step after an episode's end ignores its
    action and returns the next episode's first observation: the state is zeroed after that
    step, so the first action of every episode is taken from the zero state, as the learner
    unrolls a sequence that begins an episode.

    Example:
        carry = RecurrentState(num_envs, policy.state_size)
        q = carry.q_values(policy, obs)
        obs, r, terminated, truncated, info = env.step(q.argmax(1))
        carry.stepped(terminated, truncated)
    """

    def __init__(self, num_envs: int, size: int):
        self.h = np.zeros((num_envs, size), np.float32)
        self.c = np.zeros((num_envs, size), np.float32)
        self.restart = np.zeros(num_envs, dtype=bool)  # this sub-env's coming step is a reset

    def q_values(self, policy: LSTMQPolicy, obs: np.ndarray) -> np.ndarray:
        """Q-values of `obs` from the carried state, which then moves one step on."""
        if policy.state_size != self.h.shape[1]:
            raise ProtocolError(f"an lstm_q of {policy.state_size} units for a state of {self.h.shape[1]}")
        q, self.h, self.c = policy.step(obs, self.h, self.c)
        return q

    def stepped(self, terminated: np.ndarray, truncated: np.ndarray) -> None:
        """After each env step: zero the state of sub-envs whose next observation starts an episode."""
        self.h[self.restart] = 0.0
        self.c[self.restart] = 0.0
        self.restart = np.logical_or(terminated, truncated)


def population_arrays(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A version's arrays per model: one model, or M for a population (names `m<k>/<name>`,
    learner/algorithms/population.py), each with its names as a single model's and its order kept."""
    if not any("/" in name for name in arrays):
        return [arrays]
    models: dict[int, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        prefix, _, rest = name.partition("/")
        k = prefix[1:]
        if not (prefix.startswith("m") and k.isdigit() and rest):
            raise ProtocolError(f"array {name!r} of a population version is not named m<k>/<name>")
        models.setdefault(int(k), {})[rest] = array
    if sorted(models) != list(range(len(models))):
        raise ProtocolError(f"a population version holds models {sorted(models)}, not 0..M-1")
    return [models[k] for k in range(len(models))]


def member_arrays(arrays: dict[str, np.ndarray], ident: int) -> tuple[int, dict[str, np.ndarray]]:
    """The model actor `ident` acts with (ident % M of a population) and its arrays."""
    models = population_arrays(arrays)
    k = ident % len(models)
    return k, models[k]


def policy_from_arrays(arch: str, arrays: dict[str, np.ndarray]) -> MLPPolicy | NatureCNNPolicy | LSTMQPolicy:
    """The actor-side forward pass for a published architecture name."""
    if arch == LSTM_Q:
        return LSTMQPolicy.from_arrays(arch, arrays)
    if arch == NATURE_CNN:
        return NatureCNNPolicy(arrays)
    if arch == GAUSSIAN_MLP:
        return GaussianPolicy.from_arrays(arch, arrays)
    if arch == SQUASHED_GAUSSIAN_MLP:
        return SquashedGaussianPolicy.from_arrays(arch, arrays)
    if arch in (TANH_MLP, CATEGORICAL_MLP):
        mlp = MLPPolicy.from_arrays(MLP, arrays)
        kind = TanhMLPPolicy if arch == TANH_MLP else CategoricalPolicy
        return kind(mlp.layers, mlp.norms)
    return MLPPolicy.from_arrays(arch, arrays)


def limit_blas_threads() -> None:
    """One BLAS thread for this process, for good: every actor process calls it at start.

    numpy's OpenBLAS starts a thread per core for each matrix product; with many actor
    processes per host those threads fight over the same cores and a [32, 128] forward
    pass stalls for tens of milliseconds (measured on 2 busy cores: 3.7k env steps/s with
    the default, 78k with one thread). Actors scale by processes, not BLAS threads.
    """
    threadpool_limits(1, user_api="blas")


def epsilon_ladder(slot: int, slots: int, base: float, alpha: float) -> float:
    """Ape-X exploration: slot i of N explores with eps = base ** (1 + alpha * i / (N - 1))."""
    if slots == 1:
        return base
    return base ** (1 + alpha * slot / (slots - 1))
