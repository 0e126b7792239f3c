"""One module per command family: each runs its command end to end."""
