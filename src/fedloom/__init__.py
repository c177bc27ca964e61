"""fedloom: federated learning that runs the same job as a fast simulation and as a real deployment."""
