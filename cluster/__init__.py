"""Shared pieces every canopy role needs: config, key schema, wire codec, telemetry, CLI."""

__version__ = "0.1.0"
