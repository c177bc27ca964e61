"""fedloom.task: what runs on a client."""
