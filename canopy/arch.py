"""Architecture names: the one registry that the torch side (learner/network.py, the
algorithms) and the numpy side (actors/policy.py, `canopy eval`) agree on.

Place in the data flow: the learner names the architecture of every version it publishes
(`Manifest.arch`, cache/blob.py); actors, the evaluator and `canopy eval` build their
forward pass from that name and the version's arrays, and refuse any other name.
"""

from __future__ import annotations

MLP = "mlp"  # Linear layers named layers.<i>.weight/bias, ReLU between, optional layer norms
TANH_MLP = "tanh_mlp"  # an MLP whose output goes through tanh: td3's actor, actions in [-1, 1]
CATEGORICAL_MLP = "categorical_mlp"  # the mlp's outputs are action logits: ppo/impala, Discrete actions
GAUSSIAN_MLP = "gaussian_mlp"  # the mlp's outputs are a diagonal Gaussian's mean, plus a log_std [d] array
# sac's actor: an mlp with 2d outputs, a Gaussian's mean (first d) and log std (last d, clamped
# to [LOG_STD_MIN, LOG_STD_MAX] by the learner and the actors alike); action = tanh(sample).
SQUASHED_GAUSSIAN_MLP = "squashed_gaussian_mlp"
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
# r2d2's recurrent Q-network: linear layers `layers.<i>` with ReLU, an LSTM (`lstm.weight_ih_l0`,
# `lstm.weight_hh_l0`, `lstm.bias_ih_l0`, `lstm.bias_hh_l0`; torch's gate order i, f, g, o), then a
# linear `head` to one Q-value per action, in the value-rescaled space of learner/algorithms/r2d2.py.
LSTM_Q = "lstm_q"
NATURE_CNN = "nature_cnn"  # Mnih et al. (2015) convolutions over uint8 frame stacks, then an MLP
# Linear first layers on the flat observation, so observation normalization folds into them.
FOLDABLE = (MLP, TANH_MLP, CATEGORICAL_MLP, GAUSSIAN_MLP, SQUASHED_GAUSSIAN_MLP)
