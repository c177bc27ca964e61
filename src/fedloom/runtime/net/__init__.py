"""fedloom.runtime.net: the deployment grid: a gRPC server that clients at other sites dial out to."""
