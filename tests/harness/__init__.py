"""Helpers for tests that start real Flower and Ray processes."""
