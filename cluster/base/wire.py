"""Conversions between the protobuf messages of ``radixserve.v1`` and the dataclasses both sides share.

The router and the worker both turn a ``SamplingOptions`` into ``SamplingParams``: the router to refuse bad
input before routing, the worker because it trusts no caller. Errors are ``ValueError`` naming the field.
"""

from __future__ import annotations

from typing import Any

from radixserve.cluster.base.sampling_params import SamplingParams
from radixserve.v1 import types_pb2

# SamplingOptions fields that are `optional` scalars: unset keeps the SamplingParams default.
_OPTIONAL_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "frequency_penalty", "presence_penalty", "seed", "logprobs", "n")


def sampling_params_from_proto(options: types_pb2.SamplingOptions, field_prefix: str = "sampling.") -> SamplingParams:
    """The validated ``SamplingParams`` of ``options``; a ValueError names the field as ``sampling.<name>``."""
    kwargs: dict[str, Any] = {name: getattr(options, name) for name in _OPTIONAL_FIELDS if options.HasField(name)}
    kwargs.update(stop=tuple(options.stop), stop_token_ids=tuple(options.stop_token_ids), ignore_eos=options.ignore_eos)
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:
        raise ValueError(f"{field_prefix}{error}") from None


def sampling_options_to_proto(params: SamplingParams) -> types_pb2.SamplingOptions:
    """The ``SamplingOptions`` that ``sampling_params_from_proto`` turns back into ``params``."""
    options = types_pb2.SamplingOptions(stop=params.stop, stop_token_ids=params.stop_token_ids,
                                        ignore_eos=params.ignore_eos)
    for name in _OPTIONAL_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(options, name, value)
    return options
