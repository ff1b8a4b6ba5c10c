"""Component: pretokenize_merge."""
