"""Component: register_model."""
