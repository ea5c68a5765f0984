"""OutageRetry: Redis commands ride out an outage for a bounded time, shorter once the role is stopping."""

import threading
import time

import pytest
import redis

from buffer.redis_server import OutageRetry, free_port, redis_client


def test_an_outage_is_retried_for_the_bound_and_counted_once_per_client():
    retry = OutageRetry(within_s=0.6, backoff_cap_s=0.1)
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", retry=retry)  # nothing listens there
    start = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    assert 0.6 <= time.monotonic() - start < 3.0
    assert retry.failures >= 3 and client.get_retry() is retry  # redis-py's per-connection copies share it


def test_a_stopping_role_gives_up_within_the_short_bound():
    stop = threading.Event()
    retry = OutageRetry(within_s=60, backoff_cap_s=0.1, stop=stop, stopping_within_s=0.3)
    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", retry=retry)
    stop.set()
    start = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    assert 0.3 <= time.monotonic() - start < 2.0
    failures = retry.failures
    start = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):  # Redis is gone: the next call does not wait again
        client.ping()
    assert time.monotonic() - start < 0.2 and retry.failures == failures + 1
