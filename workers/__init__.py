"""tritonmesh.workers: real Triton Inference Server workers and the router's upstream channels.

``tritonmesh.workers.launcher`` (local workers) needs the ``local`` extra
(nvidia-pytriton); ``tritonmesh.workers.upstream`` needs nothing beyond grpc.
"""
