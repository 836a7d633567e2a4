"""ns per peek of the wire reader: compiled, twin, and a full protobuf decode for scale.

    python bench/wire_bench.py
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from typing import Any

from tritonclient.grpc import service_pb2 as pb
from tritonmesh._core import _wire_c, _wire_py


def _ns(fn: Callable[[bytes], Any], raw: bytes, number: int) -> float:
    return min(timeit.repeat(lambda: fn(raw), number=number, repeat=3)) / number * 1e9


def messages() -> dict[str, tuple[bytes, str]]:
    small = pb.ModelInferRequest(model_name="generate", id="req-1")
    small.parameters["sequence_id"].int64_param = 42
    small.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    small.raw_input_contents.append(b"\0" * 16)
    big = pb.ModelInferRequest(model_name="identity")
    big.inputs.add(name="INPUT0", datatype="FP32", shape=[262144])
    big.raw_input_contents.append(b"\0" * (1 << 20))
    token = pb.ModelStreamInferResponse()
    token.infer_response.id = "req-1"
    token.infer_response.model_name = "generate"
    token.infer_response.parameters["triton_final_response"].bool_param = False
    token.infer_response.outputs.add(name="TOKEN", datatype="INT32", shape=[1])
    token.infer_response.raw_output_contents.append(b"\0" * 4)
    return {
        "request, 16 B tensor": (small.SerializeToString(), "request"),
        "request, 1 MiB tensor": (big.SerializeToString(), "request"),
        "stream response (one token)": (token.SerializeToString(), "response"),
    }


def main() -> None:
    rows = []
    for name, (raw, kind) in messages().items():
        c = _wire_c.peek_request if kind == "request" else _wire_c.peek_stream_response
        py = _wire_py.peek_request if kind == "request" else _wire_py.peek_stream_response
        full = (pb.ModelInferRequest if kind == "request" else pb.ModelStreamInferResponse)
        rows.append({
            "message": name,
            "c_ns": round(_ns(c, raw, 100_000)),
            "twin_ns": round(_ns(py, raw, 20_000)),
            "protobuf_decode_ns": round(_ns(full.FromString, raw, 2_000)),
        })
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
