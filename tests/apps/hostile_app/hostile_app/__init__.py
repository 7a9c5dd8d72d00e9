"""Test app: one hostile ClientApp (partition 0) beside honest ones (see attacks.py)."""
