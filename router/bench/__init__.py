"""`tritonmesh bench`: routing experiments with real Triton workers, against real peers."""
