"""``redact_url``: no Redis password survives into anything printed or logged."""

from __future__ import annotations

import string
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radixserve.cluster.base.config import BusConfig
from radixserve.cluster.base.urls import redact_url

secrets = st.text(string.ascii_letters + string.digits + "!$&'()*+,;=%@:/?#", min_size=6, max_size=30)
hosts = st.sampled_from(["127.0.0.1", "redis.example", "[::1]"])


@given(secret=secrets, user=st.sampled_from(["", "default", "admin"]), host=hosts)
def test_the_password_of_a_url_is_never_shown_and_the_rest_is(secret: str, user: str, host: str) -> None:
    quoted = urllib.parse.quote(secret, safe="")
    for url in (f"redis://{user}:{quoted}@{host}:6379/0", f"rediss://{host}:6379/0?password={quoted}&db=1"):
        shown = redact_url(url)
        assert quoted not in shown and "***" in shown
        assert host in shown and shown.startswith(url.partition("://")[0] + "://")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock?db=2", "redis://h:1"])
def test_a_url_without_a_password_is_shown_as_it_is(url: str) -> None:
    assert redact_url(url) == url


def test_a_bad_bus_url_is_refused_without_showing_its_password() -> None:
    with pytest.raises(ValueError, match="must be a redis://") as refused:
        BusConfig(backend="redis", url="http://admin:hunter2-secret@redis.example:6379")
    assert "hunter2-secret" not in str(refused.value)
