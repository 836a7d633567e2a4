"""Peek at the few protobuf fields routing needs, straight from the wire bytes (pure Python).

Requests and responses pass through the router as bytes. Decoding a whole
``ModelInferRequest`` would copy every input tensor; routing needs only the
model name, the request id and a handful of request parameters, all of which
sit at the top level of the message. These readers walk the top-level fields,
skip everything else by its length prefix, and never copy tensor payloads.

Field numbers are Triton's (``grpc_service.proto``)::

    ModelInferRequest:        1 model_name, 2 model_version, 3 id, 4 parameters (map)
    ModelInferResponse:       1 model_name, 2 model_version, 3 id, 4 parameters (map), 5 outputs
    ModelStreamInferResponse: 1 error_message, 2 infer_response
    InferParameter:           1 bool, 2 int64, 3 string, 4 double, 5 uint64
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

__all__ = [
    "ENABLE_EMPTY_FINAL",
    "RequestInfo",
    "ResponseInfo",
    "WireError",
    "error_stream_response",
    "inject_empty_final",
    "peek_request",
    "peek_stream_response",
    "peek_work",
]

ENABLE_EMPTY_FINAL: Final = b"triton_enable_empty_final_response"
_FINAL_RESPONSE: Final = b"triton_final_response"
_SEQUENCE_ID: Final = b"sequence_id"
_SEQUENCE_START: Final = b"sequence_start"
_SEQUENCE_END: Final = b"sequence_end"
_PRIORITY: Final = b"priority"

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_UINT64_MASK: Final = (1 << 64) - 1


class WireError(ValueError):
    """The bytes are not a valid protobuf message of the expected type."""


class RequestInfo(NamedTuple):
    model_name: str
    model_version: str
    id: str
    # None when the request carries no sequence_id (or sequence_id 0, which Triton treats as none).
    sequence_id: int | str | None
    sequence_start: bool
    sequence_end: bool
    # The client's own triton_enable_empty_final_response, False when absent.
    empty_final: bool
    # Triton's request priority parameter (1 is the highest); 0 when absent, not an integer,
    # or not positive: the model's default.
    priority: int = 0


class ResponseInfo(NamedTuple):
    error_message: str
    id: str
    # triton_final_response: None when the response does not carry it at all, as in the
    # errors Triton itself raises for a request (unknown model) rather than the model's.
    final: bool | None
    has_outputs: bool

    @property
    def terminal(self) -> bool:
        """Whether this response ends its request: no more responses will follow for it."""
        return self.final is True or (self.final is None and bool(self.error_message))


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            # A 10th byte can carry bits past 64; protobuf (and _wire_c) keep the low 64.
            return result & _UINT64_MASK, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def _skip(buf: bytes, pos: int, end: int, wire_type: int) -> int:
    if wire_type == _VARINT:
        return _varint(buf, pos, end)[1]
    if wire_type == _LEN:
        length, pos = _varint(buf, pos, end)
        pos += length
    elif wire_type == _I64:
        pos += 8
    elif wire_type == _I32:
        pos += 4
    else:
        raise WireError("unsupported wire type")
    if pos > end:
        raise WireError("field runs past the end of the message")
    return pos


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field_number, wire_type, value_start, value_end) for each field in buf[pos:end].

    For length-delimited fields the value span excludes the length prefix; for
    other wire types it covers the encoded value.
    """
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == _LEN:
            length, start = _varint(buf, pos, end)
            pos = start + length
            if pos > end:
                raise WireError("a length-delimited field runs past the end of the message")
            yield field, wire_type, start, pos
        else:
            start = pos
            pos = _skip(buf, pos, end, wire_type)
            yield field, wire_type, start, pos


def _string(buf: bytes, start: int, end: int) -> str:
    try:
        return buf[start:end].decode()
    except UnicodeDecodeError:
        raise WireError("string field is not valid UTF-8") from None


def _parameter(buf: bytes, start: int, end: int) -> tuple[bytes, bool | int | bytes | None]:
    """Decode one map<string, InferParameter> entry: (key, value); a string value stays
    bytes (decoded only where routing reads it, as in _wire_c)."""
    key = b""
    value: bool | int | bytes | None = None
    for field, wire_type, s, e in _fields(buf, start, end):
        if field == 1 and wire_type == _LEN:
            key = buf[s:e]
        elif field == 2 and wire_type == _LEN:
            for pfield, pwire, ps, pe in _fields(buf, s, e):
                if pwire == _VARINT and pfield in (1, 2, 5):
                    raw = _varint(buf, ps, pe)[0]
                    if pfield == 1:
                        value = raw != 0
                    elif pfield == 2:
                        value = raw - (1 << 64) if raw >= 1 << 63 else raw
                    else:
                        value = raw
                elif pwire == _LEN and pfield == 3:
                    value = buf[ps:pe]
                elif pwire == _I64 and pfield == 4:
                    value = None  # a double never steers routing
                # Anything else is an unknown field to protobuf: the value stands.
    return key, value


def peek_request(buf: bytes) -> RequestInfo:
    """Read routing fields from a serialized ``ModelInferRequest``.

    Raises :class:`WireError` for bytes that are not a well-formed message.
    """
    end = len(buf)
    # Spans, decoded at the end so that errors surface in the same order as in _wire_c.
    name = version = rid = (0, 0)
    sequence_id: int | str | None = None
    start_flag = end_flag = empty_final = False
    priority = 0
    for field, wire_type, s, e in _fields(buf, 0, end):
        if wire_type != _LEN:
            if field <= 7:
                raise WireError(
                    f"field {field} has wire type {wire_type}, expected length-delimited"
                )
            continue
        if field == 1:
            name = (s, e)
        elif field == 2:
            version = (s, e)
        elif field == 3:
            rid = (s, e)
        elif field == 4:
            key, value = _parameter(buf, s, e)
            # Later map entries override earlier ones, as in protobuf itself.
            if key == _SEQUENCE_ID:
                # Triton reads sequence id 0 (or "") as "not in a sequence".
                if isinstance(value, bytes):
                    sequence_id = _string(value, 0, len(value)) or None
                elif isinstance(value, int) and not isinstance(value, bool):
                    sequence_id = value or None
                else:
                    sequence_id = None
            elif key == _SEQUENCE_START:
                start_flag = value is True
            elif key == _SEQUENCE_END:
                end_flag = value is True
            elif key == ENABLE_EMPTY_FINAL:
                empty_final = value is True
            elif key == _PRIORITY:
                priority = value if isinstance(value, int) and not isinstance(value, bool) \
                    and 0 < value < 1 << 63 else 0
    return RequestInfo(
        _string(buf, *name), _string(buf, *version), _string(buf, *rid), sequence_id,
        start_flag, end_flag, empty_final, priority,
    )


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(len(payload)) + payload


# parameters["triton_enable_empty_final_response"] = InferParameter(bool_param=true), encoded
# once. Appending a map entry to a serialized message is a valid merge: the last entry wins.
_EMPTY_FINAL_ENTRY: Final = _len_field(
    4, _len_field(1, ENABLE_EMPTY_FINAL) + _len_field(2, b"\x08\x01")
)


def inject_empty_final(buf: bytes) -> bytes:
    """Return the request with ``triton_enable_empty_final_response=true`` appended."""
    return buf + _EMPTY_FINAL_ENTRY


# parameters["triton_final_response"] = InferParameter(bool_param=true): what Triton adds to
# every response it sends on a stream.
_FINAL_TRUE_ENTRY: Final = _len_field(
    4, _len_field(1, _FINAL_RESPONSE) + _len_field(2, b"\x08\x01")
)


def stream_response_from_unary(response: bytes) -> bytes:
    """Wrap a serialized ``ModelInferResponse`` as the ``ModelStreamInferResponse`` Triton
    sends on a stream for a non-decoupled model: the same response, marked final."""
    return _len_field(2, response + _FINAL_TRUE_ENTRY)


def peek_stream_response(buf: bytes) -> ResponseInfo:
    """Read accounting fields from a serialized ``ModelStreamInferResponse``."""
    end = len(buf)
    message = rid = (0, 0)
    final: bool | None = None
    has_outputs = False
    for field, wire_type, s, e in _fields(buf, 0, end):
        if wire_type != _LEN:
            continue
        if field == 1:
            message = (s, e)
        elif field == 2:
            for rfield, rwire, rs, re_ in _fields(buf, s, e):
                if rwire != _LEN:
                    continue
                if rfield == 3:
                    rid = (rs, re_)
                elif rfield == 4:
                    key, value = _parameter(buf, rs, re_)
                    if key == _FINAL_RESPONSE:
                        final = value is True
                elif rfield in (5, 6):
                    has_outputs = True
    return ResponseInfo(_string(buf, *message), _string(buf, *rid), final, has_outputs)


def error_stream_response(message: str, request_id: str = "", model_name: str = "") -> bytes:
    """Serialize a ``ModelStreamInferResponse`` carrying an in-stream error, as Triton sends one."""
    inner = b""
    if model_name:
        inner += _len_field(1, model_name.encode())
    if request_id:
        inner += _len_field(3, request_id.encode())
    return _len_field(1, message.encode()) + _len_field(2, inner)


# Triton datatype -> struct format of one element (little-endian on the wire).
_RAW_FORMATS: Final = {
    b"INT8": "b", b"INT16": "h", b"INT32": "i", b"INT64": "q", b"UINT8": "B", b"UINT16": "H",
    b"UINT32": "I", b"UINT64": "Q", b"FP32": "f", b"FP64": "d",
}


def peek_work(buf: bytes, input_name: bytes, parameter: bytes) -> float | None:
    """A request's cost hint for LEAST_OUTSTANDING_WORK, or None when it carries none.

    With ``parameter`` (non-empty): the value of that request parameter (int64, uint64
    or double). Otherwise the sum of the elements of the input tensor ``input_name``, read
    from ``raw_input_contents`` (what tritonclient sends) for the integer and FP32/FP64
    datatypes. None when the parameter or input is absent, of another type, or sent in
    the typed ``contents`` field.

    Raises :class:`WireError` for bytes that are not a well-formed message.
    """
    end = len(buf)
    found: float | None = None
    index = -1  # of input_name among the inputs
    inputs = 0
    datatype = b""
    raw: tuple[int, int] | None = None
    raw_index = -1  # the input whose contents raw holds
    raws = 0
    for field, wire_type, s, e in _fields(buf, 0, end):
        if wire_type != _LEN:
            continue
        if field == 4 and parameter:
            key, value = _work_parameter(buf, s, e)
            if key == parameter:
                found = value
        elif field == 5 and not parameter:
            name = dtype = b""
            for ifield, iwire, is_, ie in _fields(buf, s, e):
                if iwire == _LEN and ifield == 1:
                    name = buf[is_:ie]
                elif iwire == _LEN and ifield == 2:
                    dtype = buf[is_:ie]
            if name == input_name:
                index, datatype = inputs, dtype
            inputs += 1
        elif field == 7 and not parameter:
            if raws == index:
                raw, raw_index = (s, e), index
            raws += 1
    if parameter:
        return found
    fmt = _RAW_FORMATS.get(datatype)
    if index < 0 or fmt is None:
        return None
    if raw_index != index:
        # The input came after its contents (a merge of two messages): look them up again.
        raw = _nth_raw_contents(buf, index)
    if raw is None:
        return None
    s, e = raw
    size = struct.calcsize(fmt)
    if (e - s) % size:
        return None
    total = 0.0
    for (value,) in struct.iter_unpack("<" + fmt, buf[s:e]):
        total += value
    return total


def _nth_raw_contents(buf: bytes, n: int) -> tuple[int, int] | None:
    """The span of the n-th ``raw_input_contents`` (bytes already checked well-formed)."""
    for field, wire_type, s, e in _fields(buf, 0, len(buf)):
        if field == 7 and wire_type == _LEN:
            if n == 0:
                return s, e
            n -= 1
    return None


def _work_parameter(buf: bytes, start: int, end: int) -> tuple[bytes, float | None]:
    """(key, numeric value) of one map<string, InferParameter> entry; None if not numeric."""
    key = b""
    value: float | None = None
    for field, wire_type, s, e in _fields(buf, start, end):
        if field == 1 and wire_type == _LEN:
            key = buf[s:e]
        elif field == 2 and wire_type == _LEN:
            value = None
            for pfield, pwire, ps, pe in _fields(buf, s, e):
                if pwire == _VARINT and pfield in (2, 5):
                    raw = _varint(buf, ps, pe)[0]
                    value = float(raw - (1 << 64) if pfield == 2 and raw >= 1 << 63 else raw)
                elif pwire == _I64 and pfield == 4:
                    value = struct.unpack_from("<d", buf, ps)[0]
                elif (pwire, pfield) in ((_VARINT, 1), (_LEN, 3)):
                    value = None  # a bool or a string: not a cost
                # Anything else is an unknown field to protobuf: the value stands.
    return key, value
