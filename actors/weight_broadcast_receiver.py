"""An actor's end of the co-located weight path: join the learner's broadcast group
(`protocol/weight_broadcast.py`) as rank `weights.broadcast_rank` and receive every version it broadcasts.

A background thread receives each version's meta, header and flat buffer (straight into GPU memory with NCCL)
and hands over the newest as a state dict of views of that buffer (`poll_latest`, never blocking), like the
ZeroMQ subscriber. The learner's closing message ends the thread; an error in the group stops it, and
`poll_latest` raises `WeightReceiveError` with the cause chained.
"""

from __future__ import annotations

import threading

import torch

from actors.weight_receiver import WeightSubscriber
from protocol.codec import decode
from protocol.config.weights import WeightsConfig
from protocol.errors import ProtocolError
from protocol.messages import WeightHeader
from protocol.weight_broadcast import CLOSE, BroadcastGroup
from protocol.weight_layout import TORCH_DTYPES, check_header


class BroadcastWeightSubscriber(WeightSubscriber):
    def __init__(self, cfg: WeightsConfig, actor_id: str, run_id: str = ""):
        super().__init__(actor_id)
        self.cfg, self.run_id = cfg, run_id
        self.versions_received: list[int] = []
        self._thread = threading.Thread(target=self._run, name=f"weight-broadcast-{actor_id}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Waits for the learner's closing message (a member cannot leave a collective group alone)."""
        self._thread.join()

    def _run(self) -> None:
        try:
            group = BroadcastGroup(self.cfg.broadcast_address, self.cfg.broadcast_rank, self.cfg.broadcast_actors + 1,
                                   self.cfg.broadcast_backend)
            while True:
                version, total, header_bytes = group.recv_meta()
                if version == CLOSE:
                    return
                header_buf = torch.empty(header_bytes, dtype=torch.uint8, device=group.device)
                group.broadcast(header_buf)
                header = decode(header_buf.cpu().numpy().tobytes())
                if not isinstance(header, WeightHeader) or header.total_bytes != total:
                    raise ProtocolError("malformed", f"broadcast v{version}: no WeightHeader of {total} bytes")
                check_header(header)
                if self.run_id and header.run_id != self.run_id:
                    raise ProtocolError("run_id", f"weights of run {header.run_id!r}, this actor is in {self.run_id!r}")
                flat = torch.empty(total, dtype=torch.uint8, device=group.device)
                if total:
                    group.broadcast(flat)
                state_dict = {m.name: flat[m.offset:m.offset + m.nbytes].view(TORCH_DTYPES[m.dtype]).view(m.shape)
                              for m in header.tensors}
                self._hand_over(version, state_dict)
                self.versions_received.append(version)
        except BaseException as e:
            self._stopped(e)
