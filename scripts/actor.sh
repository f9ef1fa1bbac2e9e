#!/usr/bin/env bash
# scripts/actor.sh CONFIG ID [--set key=value ...]
#
# Runs actor ID of the cluster that CONFIG describes (one TOML for the whole
# cluster; every key is in canopy/config.py):
#   its replay shard and cache node follow from ID, so every actor
#   of one cluster needs a distinct ID.
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" actor "$@"
