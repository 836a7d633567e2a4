/* Invariant checks after every mutating operation of the outstanding table.
   Off (0) in release builds, so the checks compile away; TRITONMESH_DEBUG=1 at build
   time (setup.py) turns them on for a debug test run. */
#ifndef TRITONMESH_DEBUG
#define TRITONMESH_DEBUG 0
#endif
