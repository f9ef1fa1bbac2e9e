"""Actor processes: vector-env stepping, the local policy copy, the transition builder."""
