"""Component: train_stage."""
