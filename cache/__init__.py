"""Model-version distribution: blob codec, cache nodes and the client actors use."""
