"""Architecture names: the one registry that the torch side (learner/network.py, the
algorithms) and the numpy side (actors/policy.py, `canopy eval`) agree on.

Place in the data flow: the learner names the architecture of every version it publishes
(`Manifest.arch`, cache/blob.py); actors, the evaluator and `canopy eval` build their
forward pass from that name and the version's arrays, and refuse any other name.
"""

from __future__ import annotations

MLP = "mlp"  # Linear layers named layers.<i>.weight/bias, ReLU between, optional layer norms
TANH_MLP = "tanh_mlp"  # an MLP whose output goes through tanh: td3's actor, actions in [-1, 1]
NATURE_CNN = "nature_cnn"  # Mnih et al. (2015) convolutions over uint8 frame stacks, then an MLP
FOLDABLE = (MLP, TANH_MLP)  # linear first layers, so observation normalization folds into them
