"""Config of the buffer service: where it listens, the Redis it stores into, staleness and admission."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class BufferConfig(Section):
    ingest_address: str = Field("tcp://127.0.0.1:5555", description="ZeroMQ ROUTER address actors send subtrees to.")
    redis_url: str = Field("", description="redis://host:port/db of an existing server; '' starts an embedded one.")
    redis_password: str = Field("", description="Redis password (AUTH), or '' for none.")
    data_dir: str = Field("", description="Directory of the embedded Redis (AOF); default <run.output_dir>/redis.")
    max_staleness: int = Field(4, ge=0, description="A tree is trained only if learner_version - its oldest "
                               "segment's version <= this.")
    max_unconsumed_trees: int = Field(1024, gt=0, description="Back-pressure: actors wait while this many "
                                      "complete trees are not yet consumed.")
    retention: Literal["keep_all", "keep_last", "trim"] = Field(
        "keep_all", description="Consumed trees: keep for replay, keep the last `retention_keep`, or delete.")
    retention_keep: int = Field(10_000, gt=0, description="Trees kept with retention=keep_last.")
    lease_seconds: float = Field(120.0, gt=0, description="A prompt lease expires this long after the last heartbeat.")
    resend_timeout_s: float = Field(5.0, gt=0, description="Actors re-send an unacknowledged subtree after this.")
