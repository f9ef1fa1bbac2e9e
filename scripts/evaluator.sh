#!/usr/bin/env bash
# scripts/evaluator.sh CONFIG ID [--set key=value ...]
#
# Runs evaluator ID of the cluster that CONFIG describes (one TOML for the whole
# cluster; every key is in canopy/config.py):
#   greedy evaluation of each newest policy version,
#   reported to the events stream.
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" evaluator "$@"
