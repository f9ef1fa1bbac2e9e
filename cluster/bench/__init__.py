"""Benchmarks behind `canopy bench <name>`: each writes one JSON object with `checks`."""
