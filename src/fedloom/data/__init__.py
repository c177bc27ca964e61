"""fedloom.data: datasets, partitioners and federated data containers."""
