"""The `small` recipe study: stages 1 -> 2 -> 3 and the paper's Tables 5 and 6 (README.md)."""
