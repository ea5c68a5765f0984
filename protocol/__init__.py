"""The contract between processes: tree and message schemas, the msgpack codec, the config."""

from protocol.codec import SCHEMA_VERSION, Limits, decode, encode
from protocol.errors import ProtocolError
from protocol.messages import (
    Ack,
    ErrorMsg,
    Heartbeat,
    Hello,
    Shutdown,
    SubtreeMsg,
    TensorMeta,
    WeightChunk,
    WeightHeader,
)
from protocol.tree import ROOT_ID, Leaf, SamplingSettings, Segment, Tree

__all__ = [
    "SCHEMA_VERSION", "Limits", "decode", "encode", "ProtocolError", "Ack", "ErrorMsg", "Heartbeat",
    "Hello", "Shutdown", "SubtreeMsg", "TensorMeta", "WeightChunk", "WeightHeader", "ROOT_ID", "Leaf",
    "SamplingSettings", "Segment", "Tree",
]
