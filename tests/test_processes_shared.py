"""What K router processes share beyond the counts: sequence pins (tritonmesh.sharedpins),
against real Triton, in both builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_processes import Endpoint, _inferences, _write_config, endpoints  # noqa: F401
from tritonmesh.sharedpins import SharedPins


def _identity(value: float) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1], "FP32")
    tensor.set_data_from_numpy(np.full(1, value, np.float32))
    return [tensor]


def _on_a_new_connection(address: str, sequence_id: int, start: bool, end: bool) -> None:
    # A connection of its own (gRPC shares one between like channels by default): the
    # kernel hands each to any of the router processes.
    with grpcclient.InferenceServerClient(
            address, channel_args=[("grpc.use_local_subchannel_pool", 1)]) as client:
        client.infer("identity", _identity(sequence_id), sequence_id=sequence_id,
                     sequence_start=start, sequence_end=end)


@pytest.mark.triton
@pytest.mark.parametrize("processes", [2, 3])
def test_a_sequence_reaches_one_instance_from_every_router_process(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint],  # noqa: F811
        processes: int) -> None:
    workers = worker_addresses[:2]
    endpoint = Endpoint(_write_config(tmp_path / "c.json", workers, processes), processes)
    endpoints.append(endpoint)
    address = endpoint.running.address
    steps = 6
    for sequence_id in range(101, 109):
        before = [_inferences(w) for w in workers]
        for step in range(steps):
            _on_a_new_connection(address, sequence_id, step == 0, step == steps - 1)
        gained = [_inferences(w) - b for w, b in zip(workers, before, strict=True)]
        assert sorted(gained) == [0, steps], (sequence_id, gained)
    endpoint.quiescent()
    # 48 connections: the kernel spread them over every router process, so the pins
    # above were made in one process and followed in the others.
    served = [endpoint.updates(i) for i in range(1, processes + 1)]
    assert all(served), served
    pins = SharedPins.attach(f"tritonmesh-{endpoint.pid}-pins", 1)
    try:
        assert len(pins) == 0  # every sequence ended: no pin left
    finally:
        pins.close()
