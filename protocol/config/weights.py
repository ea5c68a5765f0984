"""Config of the weight push (learner -> actors, through relay actors): address, fan-out, chunking, credit
window, timeouts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from protocol.config.base import Section


class WeightsConfig(Section):
    address: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ address the learner binds (ROUTER) and "
                         "actors connect to; a bind may use tcp://*:PORT, or PORT * for any free port.")
    chunk_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Most bytes of one WeightChunk (its payload "
                             "frame). Chunks are cut at tensor boundaries: actors use a tensor inside one chunk in "
                             "place and copy only tensors larger than this; window x chunk_bytes bounds the bytes "
                             "queued per actor.")
    window: int = Field(4, gt=0, description="Chunks a learner sends one actor before that actor acknowledges "
                        "(credit window; bounds the bytes queued per actor).")
    send_timeout_s: float = Field(30.0, gt=0, description="A send that cannot proceed, or an actor that returns no "
                                  "credit mid-transfer, for this long is a WeightSendTimeout; the actor is dropped.")
    peer_timeout_s: float = Field(10.0, gt=0, description="The learner forgets an idle actor silent for this long.")
    heartbeat_s: float = Field(1.0, gt=0, description="An idle actor tells the learner its version this often.")
    stall_timeout_s: float = Field(30.0, gt=0, description="An actor abandons a transfer that brings no chunk for "
                                   "this long and asks again.")
    fanout: int = Field(2, gt=0, description="Actors the learner streams each version to itself, and actors each "
                        "relay streams it to; the others are fed by relays (a tree of depth about log_fanout(actors)), "
                        "so the learner's egress per version is at most `fanout` model copies. Chunks stream through "
                        "every hop as they arrive, so the hops of a deeper tree overlap.")
    relay: bool = Field(True, description="This actor serves the versions it receives to other actors (chunk by "
                        "chunk, as they arrive); false: it is only ever a leaf of the relay tree.")
    relay_port: int = Field(0, ge=0, le=65535, description="TCP port this actor's relay binds (0 = any free port).")
    relay_host: str = Field("", description="Host name or IP other actors reach this actor's relay at; '' = this "
                            "host's address on the route to the learner.")
    broadcast_actors: int = Field(0, ge=0, description="Learner: actors on its node that receive every version by "
                                  "a collective broadcast (NCCL between GPUs; `broadcast_backend`) instead of the "
                                  "ZeroMQ push; 0 = none. The learner waits for all of them to join at start.")
    transport: Literal["zmq", "broadcast"] = Field("zmq", description="Actor: how it receives weights: `zmq` (the "
                                                   "push and relay tree) or `broadcast` (co-located with the learner, "
                                                   "rank `broadcast_rank` of its broadcast group).")
    broadcast_rank: int = Field(0, ge=0, description="Actor with transport `broadcast`: its rank in the group, "
                                "1..broadcast_actors (the learner is rank 0).")
    broadcast_address: str = Field("127.0.0.1:29650", description="host:port of the broadcast group's TCP store, "
                                   "hosted by the learner (one node: keep it on loopback).")
    broadcast_backend: Literal["nccl", "gloo"] = Field("nccl", description="Collective backend of the broadcast "
                                                       "group: nccl (GPU memory to GPU memory) or gloo (CPU).")

    @model_validator(mode="after")
    def _broadcast_rank_given(self) -> WeightsConfig:
        if self.transport == "broadcast" and self.broadcast_rank < 1:
            raise ValueError("weights.broadcast_rank: an actor with transport 'broadcast' needs its rank in the "
                             "group, 1..broadcast_actors")
        return self
