"""Component: gate."""
