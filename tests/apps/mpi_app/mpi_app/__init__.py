"""Deterministic test app for the flwr-transports MPI runtime."""
