"""The training pipeline's step logic, cluster placement and Trainer launcher (no kfp imports)."""
