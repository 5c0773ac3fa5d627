"""Readers that turn training artifacts on disk into a `Run`, without importing torch."""
