"""canopy: distributed reinforcement learning. This package is its ground floor.

Layers, arrows pointing down only (tests/unit/test_layers.py keeps them so):
- operator tools, `canopy.cluster` (cluster/): the CLI, `canopy up`, status, eval and
  export, plots, benches, host plans and deployments;
- roles, `canopy.learner`, `canopy.actors`, `canopy.cache`, `canopy.replay` (learner/,
  actors/, cache/, replay/): the processes a run is made of;
- ground, `canopy` itself (canopy/): config, wire codec, Redis keys, errors, versions,
  telemetry, the learner lease and fencing, env specs, connections.
"""

__version__ = "0.1.0"
