"""FDA test app for the loopback deployment test."""
