"""The toy kit: small, offline, deterministic models and run artifacts for demos, tests and benchmarks."""
