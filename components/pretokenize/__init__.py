"""Component: pretokenize."""
