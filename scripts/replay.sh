#!/usr/bin/env bash
# scripts/replay.sh CONFIG ID [--set key=value ...]
#
# Runs replay shard ID of the cluster that CONFIG describes (one TOML for the whole
# cluster; every key is in canopy/config.py):
#   a ZeroMQ ROUTER bound to cluster.replay[ID].
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" replay "$@"
