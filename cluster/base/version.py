"""The installed radixserve's version, which every server reports (OpenAI ``/version``, SGLang-style
``/get_server_info``, KServe ``ServerMetadata``)."""

from __future__ import annotations

import functools
import importlib.metadata


@functools.cache
def radixserve_version() -> str:
    """Read once from the package metadata (a file read), then remembered."""
    return importlib.metadata.version("radixserve")
