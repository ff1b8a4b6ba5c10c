"""Component: open_run."""
