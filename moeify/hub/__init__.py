"""Saving, loading, exporting and publishing converted models."""
