"""Shared machinery: config validation, run directories, seeding, results."""
