"""fedloom.runtime: the server loop, the Grid interface and its simulation backends."""
