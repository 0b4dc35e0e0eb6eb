"""URLs as they may be shown: ``redact_url`` hides the password a Redis URL may carry, for every progress line,
log line and error message that names a URL."""

from __future__ import annotations

import re
import urllib.parse

REDACTED = "***"
_QUERY_PASSWORD = re.compile(r"(?<=[?&])password=[^&#]*")


def redact_url(url: str) -> str:
    """``url`` with its password (``user:password@``, or a ``password=`` query parameter, as redis-py reads them)
    replaced by ``***``; a URL that does not parse comes back without anything before its last ``@``."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url.rpartition("@")[2]
    if password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        url = url.replace(f"{userinfo}@", f"{parts.username or ''}:{REDACTED}@", 1)
    return _QUERY_PASSWORD.sub(f"password={REDACTED}", url)
