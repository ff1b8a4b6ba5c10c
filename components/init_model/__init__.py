"""Component: init_model."""
