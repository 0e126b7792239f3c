"""Checking a merged model: recomputation, tolerances, checksums."""
