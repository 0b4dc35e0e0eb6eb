from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteHint(_message.Message):
    __slots__ = ("worker_id", "page_hashes", "withdrawn")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_HASHES_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    page_hashes: _containers.RepeatedScalarFieldContainer[int]
    withdrawn: bool
    def __init__(self, worker_id: _Optional[str] = ..., page_hashes: _Optional[_Iterable[int]] = ..., withdrawn: _Optional[bool] = ...) -> None: ...

class RouteHints(_message.Message):
    __slots__ = ("router_id", "hints")
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    hints: _containers.RepeatedCompositeFieldContainer[RouteHint]
    def __init__(self, router_id: _Optional[str] = ..., hints: _Optional[_Iterable[_Union[RouteHint, _Mapping]]] = ...) -> None: ...
