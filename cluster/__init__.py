"""Operator tools: the CLI, `canopy up` (launcher, supervisor, monitor, report), status,
eval and export, plots, benches, host plans. They stand on the roles and the ground."""
