"""Config of the weight push (learner -> actors): address, chunking, credit window, timeouts.
"""

from pydantic import Field

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
