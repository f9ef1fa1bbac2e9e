#!/usr/bin/env bash
# scripts/learner-standby.sh CONFIG ID [--set key=value ...]
#
# Runs a warm standby learner ID of the cluster that CONFIG describes (give it an id no
# other learner has, e.g. 1): torch imported and the model built, it waits on the active
# learner's lease (checkpoint.lease_ttl_s) and takes over from the newest checkpoint when
# the lease expires.
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" learner "$@" --standby
