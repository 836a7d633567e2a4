from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListInstancesRequest(_message.Message):
    __slots__ = ("variant",)
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    def __init__(self, variant: _Optional[str] = ...) -> None: ...

class Variant(_message.Message):
    __slots__ = ("name", "weight", "routing_strategy", "models", "hint_quality", "hint_residual_sd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    HINT_QUALITY_FIELD_NUMBER: _ClassVar[int]
    HINT_RESIDUAL_SD_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    routing_strategy: str
    models: _containers.RepeatedScalarFieldContainer[str]
    hint_quality: float
    hint_residual_sd: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., routing_strategy: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., hint_quality: _Optional[float] = ..., hint_residual_sd: _Optional[float] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("variant", "slot", "address", "state", "healthy", "outstanding", "requests", "errors", "weight")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    slot: int
    address: str
    state: str
    healthy: bool
    outstanding: int
    requests: int
    errors: int
    weight: float
    def __init__(self, variant: _Optional[str] = ..., slot: _Optional[int] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., healthy: _Optional[bool] = ..., outstanding: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("variants", "instances")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class AddInstanceRequest(_message.Message):
    __slots__ = ("variant", "address", "weight")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    variant: str
    address: str
    weight: float
    def __init__(self, variant: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class RemoveInstanceRequest(_message.Message):
    __slots__ = ("variant", "address", "drain_timeout_s")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    variant: str
    address: str
    drain_timeout_s: float
    def __init__(self, variant: _Optional[str] = ..., address: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class RemoveInstanceResponse(_message.Message):
    __slots__ = ("instance", "drained")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    drained: bool
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ..., drained: _Optional[bool] = ...) -> None: ...
