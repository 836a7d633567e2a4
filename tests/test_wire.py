"""The wire peek agrees with protobuf itself, and rejects what protobuf rejects."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonmesh import wire
from tritonmesh._core import NO_EXTENSIONS
from tritonmesh.wire import WireError, error_stream_response, inject_empty_final

IMPLEMENTATIONS = [
    pytest.param("py", id="py"),
    pytest.param("c", id="c", marks=pytest.mark.skipif(
        NO_EXTENSIONS, reason="TRITONMESH_NO_EXTENSIONS=1: the twin is under test")),
]


def _impl(name: str) -> tuple[Any, Any]:
    if name == "py":
        return wire.py_peek_request, wire.py_peek_stream_response
    from tritonmesh._core import _wire_c

    return _wire_c.peek_request, _wire_c.peek_stream_response


@pytest.fixture(params=IMPLEMENTATIONS)
def peek_request(request: pytest.FixtureRequest) -> Any:
    return _impl(request.param)[0]


@pytest.fixture(params=IMPLEMENTATIONS)
def peek_stream_response(request: pytest.FixtureRequest) -> Any:
    return _impl(request.param)[1]


def test_native_wire_loaded() -> None:
    """Fails if the compiled peek silently did not build or load."""
    if NO_EXTENSIONS:
        assert wire.peek_request is wire.py_peek_request
    else:
        assert wire.peek_request.__module__ == "tritonmesh._core._wire_c"


def _request(**params: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="generate", model_version="1", id="req-7")
    for key, value in params.items():
        if isinstance(value, bool):
            req.parameters[key].bool_param = value
        elif isinstance(value, int):
            req.parameters[key].int64_param = value
        elif isinstance(value, str):
            req.parameters[key].string_param = value
    tensor = req.inputs.add(name="PROMPT_TOKENS", datatype="INT32", shape=[1])
    tensor.parameters["x"].int64_param = 3
    req.raw_input_contents.append(b"\x10\x00\x00\x00" * 1000)
    return req


def test_peek_reads_routing_fields(peek_request: Any) -> None:
    raw = _request(sequence_id=42, sequence_start=True).SerializeToString()
    info = peek_request(raw)
    assert (info.model_name, info.model_version, info.id) == ("generate", "1", "req-7")
    assert info.sequence_id == 42 and info.sequence_start and not info.sequence_end
    assert not info.empty_final


def test_peek_reads_the_request_priority(peek_request: Any) -> None:
    assert peek_request(_request().SerializeToString()).priority == 0
    assert peek_request(_request(priority=3).SerializeToString()).priority == 3
    req = _request()
    req.parameters["priority"].uint64_param = 2  # what tritonclient sends
    assert peek_request(req.SerializeToString()).priority == 2
    # Not a positive integer: the model's default, as if absent.
    for value in (-1, "high", True):
        assert peek_request(_request(priority=value).SerializeToString()).priority == 0
    req.parameters["priority"].uint64_param = 1 << 63
    assert peek_request(req.SerializeToString()).priority == 0


def test_peek_string_and_negative_sequence_ids(peek_request: Any) -> None:
    assert peek_request(_request(sequence_id="abc").SerializeToString()).sequence_id == "abc"
    assert peek_request(_request(sequence_id=-5).SerializeToString()).sequence_id == -5
    # Triton reads 0 as "no sequence".
    assert peek_request(_request(sequence_id=0).SerializeToString()).sequence_id is None


def test_inject_empty_final_is_a_valid_protobuf_merge(peek_request: Any) -> None:
    raw = _request(triton_enable_empty_final_response=False).SerializeToString()
    assert not peek_request(raw).empty_final
    injected = inject_empty_final(raw)
    decoded = pb.ModelInferRequest.FromString(injected)
    assert decoded.parameters["triton_enable_empty_final_response"].bool_param is True
    assert decoded.raw_input_contents == pb.ModelInferRequest.FromString(raw).raw_input_contents
    assert peek_request(injected).empty_final


def test_peek_stream_response_final_and_outputs(peek_stream_response: Any) -> None:
    resp = pb.ModelStreamInferResponse()
    resp.infer_response.id = "r1"
    resp.infer_response.parameters["triton_final_response"].bool_param = True
    info = peek_stream_response(resp.SerializeToString())
    assert info.final and not info.has_outputs and info.id == "r1" and not info.error_message
    resp.infer_response.outputs.add(name="TOKEN", datatype="INT32", shape=[1])
    resp.infer_response.raw_output_contents.append(b"\x00" * 4)
    resp.infer_response.parameters["triton_final_response"].bool_param = False
    info = peek_stream_response(resp.SerializeToString())
    assert info.final is False and info.has_outputs and not info.terminal


def test_terminal_responses(peek_stream_response: Any) -> None:
    # Triton's own error for a request (unknown model) carries no final flag and ends it.
    unknown = peek_stream_response(error_stream_response("Request for unknown model", "c"))
    assert unknown.final is None and unknown.terminal
    # A model's error sent with the final flag ends it; one without the flag does not.
    resp = pb.ModelStreamInferResponse(error_message="boom")
    resp.infer_response.parameters["triton_final_response"].bool_param = False
    assert not peek_stream_response(resp.SerializeToString()).terminal
    resp.infer_response.parameters["triton_final_response"].bool_param = True
    assert peek_stream_response(resp.SerializeToString()).terminal


def test_error_stream_response_round_trips() -> None:
    raw = error_stream_response("boom", "id-1", "generate")
    decoded = pb.ModelStreamInferResponse.FromString(raw)
    assert decoded.error_message == "boom"
    assert decoded.infer_response.id == "id-1"
    assert decoded.infer_response.model_name == "generate"


def test_stream_response_from_unary_is_the_response_marked_final(
        peek_stream_response: Any) -> None:
    unary = pb.ModelInferResponse(model_name="identity", model_version="1", id="r1")
    unary.parameters["user"].string_param = "kept"
    unary.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1])
    unary.raw_output_contents.append(b"\0\0\x80?")
    raw = wire.stream_response_from_unary(unary.SerializeToString())
    expected = pb.ModelStreamInferResponse()
    expected.infer_response.CopyFrom(unary)
    expected.infer_response.parameters["triton_final_response"].bool_param = True
    assert pb.ModelStreamInferResponse.FromString(raw) == expected
    info = peek_stream_response(raw)
    assert info.final is True and info.has_outputs and info.id == "r1"


@pytest.mark.parametrize("raw", [
    b"\x0a\xff\xff\xff\xff\x0f",  # model_name declares 4 GiB
    b"\x0a\x05abc",                # truncated string
    b"\x0a",                       # truncated length
    b"\xff" * 11,                  # varint too long
    b"\x0b",                       # wire type 3 (groups) is not supported
    b"\x08\x01",                   # model_name as a varint
    b"\x0a\x02\xff\xfe",           # model_name not UTF-8
])
def test_malformed_requests_raise(raw: bytes, peek_request: Any) -> None:
    with pytest.raises(WireError):
        peek_request(raw)


def _outcome(fn: Any, raw: bytes) -> Any:
    try:
        return fn(raw)
    except WireError as exc:
        return ("WireError", str(exc))


def _both(raw: bytes, which: int) -> list[Any]:
    impls = ["py"] if NO_EXTENSIONS else ["py", "c"]
    return [_outcome(_impl(name)[which], raw) for name in impls]


@given(
    model=st.text(max_size=30),
    request_id=st.text(max_size=30),
    seq=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(min_size=1, max_size=8)),
    start=st.booleans(),
    empty_final=st.booleans(),
    payload=st.binary(max_size=64),
)
def test_peek_matches_protobuf(model: str, request_id: str, seq: int | str | None, start: bool,
                               empty_final: bool, payload: bytes) -> None:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    if seq is not None:
        if isinstance(seq, int):
            req.parameters["sequence_id"].int64_param = seq
        else:
            req.parameters["sequence_id"].string_param = seq
    req.parameters["sequence_start"].bool_param = start
    req.parameters["triton_enable_empty_final_response"].bool_param = empty_final
    req.raw_input_contents.append(payload)
    for info in _both(req.SerializeToString(), 0):
        assert info.model_name == model and info.id == request_id
        assert info.sequence_id == (None if seq in (0, "") else seq)
        assert info.sequence_start == start and info.empty_final == empty_final


@given(st.binary(max_size=96))
def test_c_and_twin_agree_on_any_bytes(raw: bytes) -> None:
    for which in (0, 1):
        outcomes = _both(raw, which)
        assert all(o == outcomes[0] for o in outcomes), outcomes


@given(st.lists(st.tuples(st.sampled_from([b"sequence_id", b"sequence_start",
                                            b"triton_enable_empty_final_response", b"x"]),
                          st.binary(max_size=12)), max_size=6),
       st.binary(max_size=16))
def test_c_and_twin_agree_on_mutated_parameters(entries: list[tuple[bytes, bytes]],
                                                tail: bytes) -> None:
    """Parameter maps with arbitrary InferParameter bytes, then arbitrary trailing bytes."""
    def ld(field: int, payload: bytes) -> bytes:
        return bytes([field << 3 | 2, len(payload)]) + payload

    raw = ld(1, b"m") + b"".join(ld(4, ld(1, k) + ld(2, v)) for k, v in entries) + tail
    outcomes = _both(raw, 0)
    assert all(o == outcomes[0] for o in outcomes), outcomes


# -- the cost hint (LEAST_OUTSTANDING_WORK) ------------------------------------------------

def _peek_work_impls() -> list[Any]:
    impls = [wire.py_peek_work]
    if not NO_EXTENSIONS:
        from tritonmesh._core import _wire_c

        impls.append(_wire_c.peek_work)
    return impls


@pytest.mark.parametrize("peek_work", _peek_work_impls())
def test_peek_work_reads_inputs_and_parameters(peek_work: Any) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    # Built by tritonclient itself, as a user's request reaches the router.
    prompt = grpcclient.InferInput("PROMPT_TOKENS", [1], "INT32")
    prompt.set_data_from_numpy(np.array([32], dtype=np.int32))
    tokens = grpcclient.InferInput("MAX_TOKENS", [2], "INT64")
    tokens.set_data_from_numpy(np.array([300, -4], dtype=np.int64))
    req = pb.ModelInferRequest(model_name="generate", id="w")
    for tensor in (prompt, tokens):
        req.inputs.append(tensor._get_tensor())
        req.raw_input_contents.append(tensor._get_content())
    req.parameters["max_tokens"].int64_param = 77
    req.parameters["budget"].double_param = 2.5
    req.parameters["big"].uint64_param = 2**63 + 1
    req.parameters["name"].string_param = "x"
    raw = req.SerializeToString()
    assert peek_work(raw, b"MAX_TOKENS", b"") == 296.0  # the sum of its elements
    assert peek_work(raw, b"PROMPT_TOKENS", b"") == 32.0
    assert peek_work(raw, b"MISSING", b"") is None
    assert peek_work(raw, b"", b"max_tokens") == 77.0
    assert peek_work(raw, b"", b"budget") == 2.5
    assert peek_work(raw, b"", b"big") == float(2**63 + 1)
    assert peek_work(raw, b"", b"name") is None  # not a number
    for datatype, values in (("FP32", [0.5, 1.25]), ("UINT8", [200, 7]), ("INT8", [-3, 5]),
                             ("FP64", [1e10]), ("UINT16", [65535])):
        req = pb.ModelInferRequest(model_name="m")
        req.inputs.add(name="N", datatype=datatype, shape=[len(values)])
        req.raw_input_contents.append(np.array(
            values, dtype=grpcclient.triton_to_np_dtype(datatype)).tobytes())
        assert peek_work(req.SerializeToString(), b"N", b"") == sum(values), datatype
    with pytest.raises(WireError):
        peek_work(b"\x2a\x05ab", b"N", b"")


@given(st.binary(max_size=96), st.sampled_from([b"N", b""]), st.sampled_from([b"p", b""]))
def test_peek_work_c_and_twin_agree_on_any_bytes(raw: bytes, name: bytes, param: bytes) -> None:
    outcomes = [_outcome(lambda b, f=f: f(b, name, param), raw) for f in _peek_work_impls()]
    assert all(o == outcomes[0] for o in outcomes), outcomes


@given(st.lists(st.tuples(st.sampled_from([b"N", b"M"]),
                          st.sampled_from([b"INT32", b"INT64", b"UINT64", b"FP32", b"FP64",
                                           b"INT16", b"BYTES"]),
                          st.binary(max_size=24)), max_size=4),
       st.lists(st.tuples(st.sampled_from([b"p", b"q"]), st.binary(max_size=12)), max_size=3))
def test_peek_work_c_and_twin_agree_on_tensors(tensors: list[tuple[bytes, bytes, bytes]],
                                               params: list[tuple[bytes, bytes]]) -> None:
    """Inputs with arbitrary raw contents and parameters with arbitrary value bytes."""
    def ld(field: int, payload: bytes) -> bytes:
        return bytes([field << 3 | 2, len(payload)]) + payload

    raw = b"".join(ld(5, ld(1, n) + ld(2, d)) for n, d, _ in tensors)
    raw += b"".join(ld(4, ld(1, k) + ld(2, v)) for k, v in params)
    raw += b"".join(ld(7, contents) for _, _, contents in tensors)
    for name, param in ((b"N", b""), (b"", b"p")):
        # repr: the same NaN from both is agreement, though NaN != NaN.
        outcomes = [repr(_outcome(lambda b, f=f, n=name, q=param: f(b, n, q), raw))
                    for f in _peek_work_impls()]
        assert all(o == outcomes[0] for o in outcomes), outcomes
