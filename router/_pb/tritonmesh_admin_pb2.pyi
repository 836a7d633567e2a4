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
    __slots__ = ("name", "weight", "routing_strategy", "models", "max_concurrency_per_instance", "hint_quality", "hint_residual_sd")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUTING_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_PER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HINT_QUALITY_FIELD_NUMBER: _ClassVar[int]
    HINT_RESIDUAL_SD_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    routing_strategy: str
    models: _containers.RepeatedScalarFieldContainer[str]
    max_concurrency_per_instance: int
    hint_quality: float
    hint_residual_sd: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., routing_strategy: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., max_concurrency_per_instance: _Optional[int] = ..., hint_quality: _Optional[float] = ..., hint_residual_sd: _Optional[float] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("variant", "slot", "address", "state", "healthy", "outstanding", "requests", "errors", "weight", "load_report", "external_requests")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LOAD_REPORT_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    variant: str
    slot: int
    address: str
    state: str
    healthy: bool
    outstanding: int
    requests: int
    errors: int
    weight: float
    load_report: str
    external_requests: float
    def __init__(self, variant: _Optional[str] = ..., slot: _Optional[int] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., healthy: _Optional[bool] = ..., outstanding: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., weight: _Optional[float] = ..., load_report: _Optional[str] = ..., external_requests: _Optional[float] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("variants", "instances", "data_path", "data_path_reason", "processes")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    data_path: str
    data_path_reason: str
    processes: int
    def __init__(self, variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., data_path: _Optional[str] = ..., data_path_reason: _Optional[str] = ..., processes: _Optional[int] = ...) -> None: ...

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

class VariantWeight(_message.Message):
    __slots__ = ("variant", "weight", "max_concurrency_per_instance")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_PER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    variant: str
    weight: float
    max_concurrency_per_instance: int
    def __init__(self, variant: _Optional[str] = ..., weight: _Optional[float] = ..., max_concurrency_per_instance: _Optional[int] = ...) -> None: ...

class UpdateVariantWeightsRequest(_message.Message):
    __slots__ = ("variants",)
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[VariantWeight]
    def __init__(self, variants: _Optional[_Iterable[_Union[VariantWeight, _Mapping]]] = ...) -> None: ...

class UpdateVariantWeightsResponse(_message.Message):
    __slots__ = ("variants",)
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[Variant]
    def __init__(self, variants: _Optional[_Iterable[_Union[Variant, _Mapping]]] = ...) -> None: ...
