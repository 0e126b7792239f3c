"""Checks made before any output exists: options, devices, adapter values."""
