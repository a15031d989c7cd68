"""Differential privacy: sample-level DP-SGD, client-level DP and their accounting."""
