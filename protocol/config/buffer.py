"""Config of the buffer service: where it listens, the Redis it stores into, staleness and admission."""

from typing import Literal

from pydantic import Field

from protocol.config.base import Section


class BufferConfig(Section):
    ingest_address: str = Field("tcp://127.0.0.1:5555", description="ZeroMQ ROUTER address actors send subtrees to.")
    redis_url: str = Field("", description="redis://host:port/db of an existing server; '' starts an embedded one.")
    redis_password: str = Field("", description="Redis password (AUTH), or '' for none.")
    redis_retry_s: float = Field(300.0, gt=0, description="How long the buffer, the learner and the prompt feed ride "
                                 "out a Redis outage (commands retried with exponential backoff, logged, counted) "
                                 "before they give up with the error.")
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
    grant_timeout_s: float = Field(30.0, gt=0, description="An actor whose prompt request the buffer has not answered "
                                   "for this long (down, restarting) logs it, counts it and asks again, for as long "
                                   "as the outage lasts; its unacknowledged pieces are re-sent when the buffer is back.")
    backpressure_wait_s: float = Field(0.2, gt=0, description="An actor told to wait (buffer full, no permit) "
                                       "asks again after this.")
    max_unacked_pieces: int = Field(64, gt=0, description="An actor sends at most this many pieces ahead of "
                                    "their acks, then waits.")
    claim_idle_s: float = Field(30.0, ge=0, description="The learner takes over trees another (dead) consumer "
                                "read but did not acknowledge for this long.")
    tombstone_seconds: float = Field(86_400.0, gt=0, description="How long the id of a trimmed or expired tree "
                                     "keeps refusing re-sent pieces (so a late duplicate cannot re-create it).")
    max_batch_messages: int = Field(256, gt=0, description="Messages the service reads before one Redis round trip.")
    prompt_feed: bool = Field(True, description="The service keeps the prompt queue filled from the `prompts` "
                              "section, epoch after epoch; off = prompts are queued by other means (tests, tools).")
