"""Learner checkpoints in replicated Redis shards (see learner/checkpoint/store.py)."""
