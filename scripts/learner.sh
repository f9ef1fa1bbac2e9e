#!/usr/bin/env bash
# scripts/learner.sh CONFIG ID [--set key=value ...]
#
# Runs learner ID of the cluster that CONFIG describes (one TOML for the whole
# cluster; every key is in canopy/config.py):
#   samples every replay shard, trains (on CUDA when present
#   and learner.device allows), publishes versions to the Redis root.
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" learner "$@"
