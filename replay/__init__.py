"""Replay service: shard server, tables, rate limiters and the actor/learner clients."""
