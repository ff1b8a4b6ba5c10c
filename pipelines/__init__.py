"""Pipelines of the UniToken platform (KFP). Compile: python -m pipelines.unitoken_training --out FILE."""
