"""Component: close_run."""
