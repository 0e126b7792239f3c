"""What commands say: summaries, `--json`, `inspect`'s reports."""
