"""fedloom.tracking: the run store (SQLite), checkpoints (safetensors) and run summaries."""
