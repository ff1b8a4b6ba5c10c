"""Component: evaluate."""
