"""Probes: one module per question, each registering itself by kind (see `base`)."""
