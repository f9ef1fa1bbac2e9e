#!/usr/bin/env bash
# scripts/cache.sh CONFIG ID [--set key=value ...]
#
# Runs cache node ID of the cluster that CONFIG describes (one TOML for the whole
# cluster; every key is in canopy/config.py):
#   fed from the Redis root, bound to cluster.cache_fetch[ID]
#   and cluster.cache_notify[ID].
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" cache "$@"
