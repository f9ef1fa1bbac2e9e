#!/usr/bin/env bash
# scripts/redis.sh CONFIG ID [--set key=value ...]
#
# Runs Redis shard ID of the cluster that CONFIG describes (one TOML for the whole
# cluster; every key is in canopy/config.py):
#   a real redis-server, exec'd in place, listening on
#   cluster.redis[ID], configured by a redis.conf written under run.dir/redis-ID/
#   (default user off; user cluster.redis_user with the password in
#   cluster.password_file).
exec "$(dirname "${BASH_SOURCE[0]}")/role.sh" redis "$@"
