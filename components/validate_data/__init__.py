"""Component: validate_data."""
