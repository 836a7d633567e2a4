"""Fuzzing every reader of client bytes in the wire peek, the compiled one and its twin.

For any bytes, and for mutations of valid encodings made by protobuf itself (so the fuzzer
reaches parameter values, input tensors and their raw contents, not just the first header):

* nothing crashes and nothing raises but the documented ``WireError``;
* the compiled peek and the twin agree: the same result, or WireError with the same message;
* on a message that protobuf decodes, a peek that succeeds reads what protobuf reads, and on
  what protobuf serialized, the peek succeeds.

In the suite this runs a few hundred examples a test, on whichever build is under test.
``.ci/fuzz`` runs it for longer against an AddressSanitizer build of ``_wire_c`` (loaded from
``TRITONMESH_FUZZ_WIRE_C``, not the tree's own extension), where a read past a buffer aborts
the run, and, when atheris is installed, under atheris's coverage-guided mutator::

    python tests/test_fuzz_wire.py -max_total_time=30 [libFuzzer options]

``TRITONMESH_FUZZ_EXAMPLES`` sets the Hypothesis examples per test (default 200).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import struct
import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonmesh import wire
from tritonmesh._core import NO_EXTENSIONS
from tritonmesh.wire import WireError

EXAMPLES = int(os.environ.get("TRITONMESH_FUZZ_EXAMPLES", "200"))
fuzz_settings = settings(max_examples=EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


def _native() -> ModuleType | None:
    path = os.environ.get("TRITONMESH_FUZZ_WIRE_C")
    if path:  # an instrumented build (.ci/fuzz), loaded from its own build directory
        spec = importlib.util.spec_from_file_location("tritonmesh._core._wire_c", path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if NO_EXTENSIONS:
        return None
    from tritonmesh._core import _wire_c

    return _wire_c


NATIVE = _native()


def test_the_build_under_test_is_loaded() -> None:
    """Fails if the fuzz would silently test the twin alone where a native build exists."""
    if os.environ.get("TRITONMESH_FUZZ_WIRE_C"):
        assert NATIVE is not None and NATIVE.__file__ == os.environ["TRITONMESH_FUZZ_WIRE_C"]
    else:
        assert (NATIVE is None) == NO_EXTENSIONS


# -- the readers, each as bytes -> outcome ----------------------------------------------------

# (input_name, parameter) pairs for peek_work: by input tensor, by parameter, and names the
# valid encodings below use, so that the fuzzer reaches the raw-contents sum.
_WORK_KEYS = ((b"N", b""), (b"", b"p"), (b"", b""), (b"", b"sequence_id"))


def _readers(module: Any) -> dict[str, Callable[[bytes], Any]]:
    readers: dict[str, Callable[[bytes], Any]] = {
        "peek_request": module.peek_request,
        "peek_stream_response": module.peek_stream_response,
    }
    for name, param in _WORK_KEYS:
        readers[f"peek_work({name!r}, {param!r})"] = (
            lambda raw, n=name, p=param: module.peek_work(raw, n, p))
    return readers


TWIN = _readers(SimpleNamespace(peek_request=wire.py_peek_request,
                                 peek_stream_response=wire.py_peek_stream_response,
                                 peek_work=wire.py_peek_work))
COMPILED = _readers(NATIVE) if NATIVE is not None else {}


def _outcome(reader: Callable[[bytes], Any], raw: bytes) -> Any:
    """The result, or ("WireError", message); any other exception propagates (a finding)."""
    try:
        result = reader(raw)
    except WireError as exc:
        return ("WireError", str(exc))
    # repr: a NaN cost from both sides is agreement, though NaN != NaN.
    return repr(result) if isinstance(result, float) else result


def check(raw: bytes) -> None:
    """Every property on one input; raises AssertionError (or the crash itself) if any fails."""
    for name, reader in TWIN.items():
        twin = _outcome(reader, raw)
        if COMPILED:
            native = _outcome(COMPILED[name], raw)
            assert native == twin, (name, raw, native, twin)
    _check_against_protobuf(raw, strict=False)
    _check_rewrites(raw)


def _check_rewrites(raw: bytes) -> None:
    """What the router writes around bytes reads back as meant: a request it asks empty
    finals for reads as before with empty_final set, and a ModelInferResponse (one that
    protobuf decodes) wrapped for a stream reads as final, unless it holds what the peek
    refuses and protobuf skips (groups)."""
    try:
        pb.ModelInferResponse.FromString(raw)
        response = True
    except DecodeError:
        response = False
    peeks = [(wire.py_peek_request, wire.py_peek_stream_response)]
    if NATIVE is not None:
        peeks.append((NATIVE.peek_request, NATIVE.peek_stream_response))
    for peek_request, peek_stream_response in peeks:
        before = _outcome(peek_request, raw)
        if isinstance(before, wire.RequestInfo):
            after = peek_request(wire.inject_empty_final(raw))
            assert after == before._replace(empty_final=True), (raw, after)
        if response:
            wrapped = _outcome(peek_stream_response, wire.stream_response_from_unary(raw))
            assert wrapped == ("WireError", "unsupported wire type") or wrapped.final is True, (
                raw, wrapped)


# -- what protobuf reads ----------------------------------------------------------------------

def _parameter(params: Any, key: str) -> tuple[bool, str | None, Any]:
    """(present, which oneof field is set, its value) of one InferParameter map entry."""
    if key not in params:
        return False, None, None
    value = params[key]
    kind = value.WhichOneof("parameter_choice")
    return True, kind, getattr(value, kind) if kind else None


def _flag(params: Any, key: str) -> bool:
    _, kind, value = _parameter(params, key)
    return kind == "bool_param" and bool(value)


def _expected_request(req: Any) -> wire.RequestInfo:
    _, kind, value = _parameter(req.parameters, "sequence_id")
    sequence_id = value if kind in ("int64_param", "uint64_param", "string_param") else None
    _, kind, priority = _parameter(req.parameters, "priority")
    if kind not in ("int64_param", "uint64_param") or not 0 < priority < 1 << 63:
        priority = 0
    return wire.RequestInfo(
        req.model_name, req.model_version, req.id, sequence_id or None,
        _flag(req.parameters, "sequence_start"), _flag(req.parameters, "sequence_end"),
        _flag(req.parameters, wire.ENABLE_EMPTY_FINAL.decode()), priority)


def _expected_stream_response(resp: Any) -> wire.ResponseInfo:
    inner = resp.infer_response
    present, kind, value = _parameter(inner.parameters, "triton_final_response")
    final = (kind == "bool_param" and bool(value)) if present else None
    return wire.ResponseInfo(resp.error_message, inner.id, final,
                             bool(inner.outputs) or bool(inner.raw_output_contents))


_FORMATS = {"INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H",
            "UINT32": "I", "UINT64": "Q", "FP32": "f", "FP64": "d"}


def _expected_work(req: Any, input_name: bytes, parameter: bytes) -> float | None:
    if parameter:
        _, kind, value = _parameter(req.parameters, parameter.decode())
        return float(value) if kind in ("int64_param", "uint64_param", "double_param") else None
    index = max((i for i, t in enumerate(req.inputs) if t.name.encode() == input_name),
                default=-1)
    if index < 0 or index >= len(req.raw_input_contents):
        return None
    fmt = _FORMATS.get(req.inputs[index].datatype)
    contents = req.raw_input_contents[index]
    if fmt is None or len(contents) % struct.calcsize(fmt):
        return None
    total = 0.0
    for (value,) in struct.iter_unpack("<" + fmt, contents):
        total += value
    return total


def _same(peeked: Any, expected: Any) -> bool:
    if isinstance(expected, float) and isinstance(peeked, float):
        return peeked == expected or (math.isnan(peeked) and math.isnan(expected))
    return bool(peeked == expected)


def _check_against_protobuf(raw: bytes, *, strict: bool) -> None:
    """Where protobuf decodes ``raw``, a peek that succeeds reads what protobuf reads; with
    ``strict`` (bytes protobuf itself serialized), the peek must also succeed."""
    readers = [(wire.py_peek_request, pb.ModelInferRequest, _expected_request),
               (wire.py_peek_stream_response, pb.ModelStreamInferResponse,
                _expected_stream_response)]
    if NATIVE is not None:
        readers += [(NATIVE.peek_request, pb.ModelInferRequest, _expected_request),
                    (NATIVE.peek_stream_response, pb.ModelStreamInferResponse,
                     _expected_stream_response)]
    work = [wire.py_peek_work] + ([NATIVE.peek_work] if NATIVE is not None else [])
    decoded: dict[Any, Any] = {}
    for message in (pb.ModelInferRequest, pb.ModelStreamInferResponse):
        try:
            parsed = message.FromString(raw)
        except DecodeError:
            continue
        if _parameters_intact(parsed if message is pb.ModelInferRequest
                              else parsed.infer_response):
            decoded[message] = parsed
    for peek, message, expected in readers:
        if message not in decoded:
            continue
        try:
            peeked = peek(raw)
        except WireError:
            if strict:
                raise
            continue
        assert peeked == expected(decoded[message]), (peek, raw, peeked)
    if pb.ModelInferRequest in decoded:
        for peek_work in work:
            for name, param in _WORK_KEYS:
                try:
                    cost = peek_work(raw, name, param)
                except WireError:
                    if strict:
                        raise
                    continue
                want = _expected_work(decoded[pb.ModelInferRequest], name, param)
                assert _same(cost, want), (peek_work, name, param, raw, cost, want)


def _parameters_intact(message: Any) -> bool:
    """Whether Python's protobuf (upb) took every ``parameters`` map entry as one. An entry
    that carries an unknown field goes, whole, into the message's unknown fields there, while
    C++ protobuf (Triton's) keeps its key with the value it read, as the peek does; for such
    bytes Python's protobuf is no oracle."""
    number = message.DESCRIPTOR.fields_by_name["parameters"].number
    return all(f.field_number != number for f in UnknownFieldSet(message))


# -- valid encodings, made by protobuf --------------------------------------------------------

_KEYS = st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "p",
                         wire.ENABLE_EMPTY_FINAL.decode(), "triton_final_response", "x"])
_TEXT = st.text(max_size=12)


@st.composite
def _parameters(draw: Any, params: Any) -> None:
    for key in draw(st.lists(_KEYS, max_size=4)):
        kind = draw(st.sampled_from(["bool_param", "int64_param", "uint64_param",
                                     "string_param", "double_param"]))
        value: Any = draw({
            "bool_param": st.booleans(),
            "int64_param": st.integers(-(2**63), 2**63 - 1),
            "uint64_param": st.integers(0, 2**64 - 1),
            "string_param": _TEXT,
            "double_param": st.floats(allow_nan=True),
        }[kind])
        setattr(params[key], kind, value)


_DATATYPES = st.sampled_from([*_FORMATS, "BYTES", "BOOL", "FP16", ""])


@st.composite
def model_infer_requests(draw: Any) -> bytes:
    req = pb.ModelInferRequest(model_name=draw(_TEXT), model_version=draw(_TEXT),
                               id=draw(_TEXT))
    draw(_parameters(req.parameters))
    for _ in range(draw(st.integers(0, 3))):
        tensor = req.inputs.add(name=draw(st.sampled_from(["N", "M", ""])),
                                datatype=draw(_DATATYPES),
                                shape=draw(st.lists(st.integers(-1, 8), max_size=3)))
        draw(_parameters(tensor.parameters))
        if draw(st.booleans()):
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-5, 5), max_size=3)))
    for tensor in req.inputs:  # mostly whole elements, as tritonclient sends them
        fmt = _FORMATS.get(tensor.datatype)
        size = struct.calcsize(fmt) * draw(st.integers(0, 4)) if fmt else None
        req.raw_input_contents.append(draw(st.binary(min_size=size or 0, max_size=size or 24)))
    for _ in range(draw(st.integers(0, 1))):
        req.raw_input_contents.append(draw(st.binary(max_size=24)))
    if draw(st.booleans()):
        req.outputs.add(name=draw(_TEXT))
    return req.SerializeToString()


@st.composite
def stream_responses(draw: Any) -> bytes:
    resp = pb.ModelStreamInferResponse(error_message=draw(_TEXT))
    if draw(st.booleans()):
        inner = resp.infer_response
        inner.model_name = draw(_TEXT)
        inner.id = draw(_TEXT)
        draw(_parameters(inner.parameters))
        for _ in range(draw(st.integers(0, 2))):
            inner.outputs.add(name=draw(_TEXT), datatype=draw(_DATATYPES))
        for _ in range(draw(st.integers(0, 2))):
            inner.raw_output_contents.append(draw(st.binary(max_size=8)))
    return resp.SerializeToString()


VALID = st.one_of(model_infer_requests(), stream_responses())


# -- arbitrary messages at the wire level: any field, any wire type, nested ------------------

def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


# Any 64-bit value, and 10-byte varints whose last byte carries more than bit 63 (protobuf
# keeps the low 64 bits).
_VARINTS = st.one_of(
    st.integers(0, 2**64 - 1).map(_encode_varint),
    st.binary(min_size=10, max_size=10).map(
        lambda b: bytes(x | 0x80 for x in b[:9]) + bytes([b[9] & 0x7F])),
)
_FIELD_NUMBERS = st.one_of(st.integers(1, 7), st.integers(8, 2**29 - 1))
_NAMES = st.sampled_from([b"sequence_id", b"sequence_start", b"sequence_end", b"N", b"p",
                          wire.ENABLE_EMPTY_FINAL, b"triton_final_response", b"INT32",
                          b"FP64", b"UINT8", b"\xff\xfe"])


def _wire_fields(payloads: Any) -> Any:
    def field(number: int, wire_type: int, value: bytes) -> bytes:
        if wire_type == 2:
            value = _encode_varint(len(value)) + value
        return _encode_varint(number << 3 | wire_type) + value

    one = st.one_of(
        st.builds(field, _FIELD_NUMBERS, st.just(0), _VARINTS),
        st.builds(field, _FIELD_NUMBERS, st.just(1), st.binary(min_size=8, max_size=8)),
        st.builds(field, _FIELD_NUMBERS, st.just(5), st.binary(min_size=4, max_size=4)),
        st.builds(field, _FIELD_NUMBERS, st.just(2), payloads),
    )
    return st.lists(one, max_size=5).map(b"".join)


WIRE = st.recursive(st.one_of(st.binary(max_size=16), _NAMES), _wire_fields, max_leaves=24)


@st.composite
def mutated(draw: Any) -> bytes:
    """A valid encoding with a few byte-level edits: flips, inserts, deletes, truncation, a
    repeated slice (protobuf's own merge), or another valid message appended."""
    data = bytearray(draw(st.one_of(VALID, WIRE)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat",
                                   "append"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x07, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            end = draw(st.integers(at, len(data)))
            data[end:end] = data[at:end]
        elif op == "append":
            data += draw(VALID)
    return bytes(data)


# -- the properties, a few hundred examples each in the suite ---------------------------------

@fuzz_settings
@given(st.binary(max_size=256))
def test_any_bytes(raw: bytes) -> None:
    check(raw)


@fuzz_settings
@given(WIRE)
def test_any_message(raw: bytes) -> None:
    check(raw)


@fuzz_settings
@given(VALID)
def test_valid_encodings_read_as_protobuf_reads_them(raw: bytes) -> None:
    check(raw)
    _check_against_protobuf(raw, strict=True)


@fuzz_settings
@given(mutated())
def test_mutated_valid_encodings(raw: bytes) -> None:
    check(raw)


def _ld(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


@pytest.mark.parametrize("raw", [
    b"",
    b"\x22\x00",                            # an empty parameters entry
    b"\x22\x04\x12\x02\x10\x01",            # a parameter with no key
    b"\x22\x02\x12\x0b" + b"\xff" * 11,     # a value that declares more than its entry
    b"\x3a\x03\x01\x02",                    # raw contents past the end
    b"\x12\x00" * 4 + b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # 10-byte length
    # Findings, each once a disagreement between the builds or with protobuf:
    # a string parameter that is not UTF-8, under a key routing never reads,
    _ld(1, b"m") + _ld(4, _ld(1, b"x") + _ld(2, _ld(3, b"\xff"))),
    # 10-byte varints carrying bits past 64 (protobuf keeps the low 64),
    _ld(1, b"m") + _ld(4, _ld(1, b"sequence_id") + _ld(2, b"\x10" + b"\x80" * 9 + b"\x03")),
    _ld(1, b"m") + _ld(4, _ld(1, b"sequence_start") + _ld(2, b"\x08" + b"\x80" * 9 + b"\x02")),
    _ld(4, _ld(1, b"p") + _ld(2, b"\x28" + b"\xff" * 9 + b"\x7f")),
    # an unknown field after the value in an InferParameter (protobuf keeps the value).
    _ld(1, b"m") + _ld(4, _ld(1, b"sequence_id") + _ld(2, b"\x10\x05\x48\x01")),
    _ld(4, _ld(1, b"p") + _ld(2, b"\x10\x05\x1d\x00\x00\x00\x00")),
    # inputs named alike around the contents (two messages merged; found by atheris): the
    # last one counts, and it has no contents, or contents that came before it.
    _ld(5, _ld(1, b"N") + _ld(2, b"INT32")) + _ld(7, b"\x03\x00\x00\x00")
    + _ld(5, _ld(1, b"N") + _ld(2, b"INT32")),
    _ld(7, b"\x03\x00\x00\x00") + _ld(5, _ld(1, b"N") + _ld(2, b"INT32")),
    # a parameters entry with an unknown field (found by atheris): Python's protobuf files the
    # whole entry under unknown fields, so it is no oracle here; the builds must still agree.
    _ld(1, b"e") + _ld(2, _ld(3, b"r") + _ld(4, _ld(1, b"triton_final_response")
                                             + b"\x52\x02\x08\x01")
                       + _ld(5, _ld(1, b"OUT")) + _ld(6, b"\x01")),
])
def test_edges(raw: bytes) -> None:
    check(raw)
    _check_against_protobuf(raw, strict=False)


# -- atheris: coverage-guided, over the same properties ---------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seeds() -> list[bytes]:
    """A starting corpus: what tritonclient sends and Triton answers, protobuf-encoded."""
    req = pb.ModelInferRequest(model_name="generate", model_version="1", id="r")
    req.parameters["sequence_id"].int64_param = 7
    req.parameters["sequence_start"].bool_param = True
    req.parameters["p"].double_param = 2.5
    req.inputs.add(name="N", datatype="INT32", shape=[2])
    req.raw_input_contents.append(struct.pack("<ii", 3, -1))
    resp = pb.ModelStreamInferResponse(error_message="e")
    resp.infer_response.id = "r"
    resp.infer_response.parameters["triton_final_response"].bool_param = True
    resp.infer_response.outputs.add(name="OUT")
    resp.infer_response.raw_output_contents.append(b"\x01")
    return [req.SerializeToString(), resp.SerializeToString()]


def _atheris_main() -> None:  # pragma: no cover (run by .ci/fuzz)
    """libFuzzer's arguments; the first corpus directory (build/fuzz/corpus if none is
    given) gets the seeds and keeps what the runs find."""
    import atheris

    argv = list(sys.argv)
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if not corpora:
        corpora = [os.path.join(ROOT, "build", "fuzz", "corpus")]
        argv += corpora
    os.makedirs(corpora[0], exist_ok=True)
    for i, seed in enumerate(_seeds()):
        with open(os.path.join(corpora[0], f"seed{i}"), "wb") as f:
            f.write(seed)
    # Coverage from the twin's readers (the compiled peek is not instrumented for it):
    # instrumenting everything loaded (pytest, hypothesis, protobuf) takes minutes.
    from tritonmesh._core import _wire_py

    for function in vars(_wire_py).values():
        if inspect.isfunction(function) and function.__module__ == _wire_py.__name__:
            atheris.instrument_func(function)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    _atheris_main()
