"""The OCI runtime spec as the host sees it: bundles, their config.json, state and hooks."""
