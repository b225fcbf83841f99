"""Data preparation: pure transforms (no Ray) used by the Ray Data jobs in ``train/``."""
