"""Learner: training loop, algorithms, model publisher."""
