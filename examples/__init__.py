"""fedloom's example jobs. Each module defines ``job``; run one with ``fedloom simulate NAME``."""
