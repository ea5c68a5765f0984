"""Keeps the run's prompt queue filled from the configured prompt source, epoch after epoch.

The buffer deals prompts to actors from a Redis list (`TreeStore.add_prompts` / `lease`). The
feed reads the source rows once (`treepo.prompts.raw_rows`: reasoning-gym generators or a
JSONL/Parquet file), shuffles them per epoch with `prompts.seed + epoch`, and appends the next
rows whenever fewer than `low_water` prompts are queued, so a long run never starves and Redis
never holds more than about two refills. Prompt ids stay the source's ids (an actor finds a
reasoning-gym entry by id); the same prompt is dealt again in a later epoch under a new tree id.
Where the feed stands (epoch, position) is kept in Redis, so a restarted buffer goes on from there.
"""

from __future__ import annotations

import numpy as np

from buffer.store import Prompt, TreeStore
from protocol.config.prompts import PromptsConfig
from treepo.prompts import raw_rows


class PromptFeed:
    def __init__(self, store: TreeStore, cfg: PromptsConfig, low_water: int):
        self.store, self.cfg, self.low_water = store, cfg, max(1, low_water)
        self.rows = [Prompt(prompt_id=str(r["id"]), prompt=r["prompt"], answer=str(r["answer"])) for r in raw_rows(cfg)]
        if not self.rows:
            raise ValueError("prompts: the configured source has no rows")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.rows))

    def top_up(self) -> int:
        """Append prompts while fewer than `low_water` are queued; returns how many were added."""
        queued = self.store.r.llen(self.store.key("prompts"))
        if queued >= self.low_water:
            return 0
        epoch, pos = (int(x or 0) for x in self.store.r.hmget(self.store.key("feed"), "epoch", "pos"))
        want, batch = 2 * self.low_water - queued, []
        while len(batch) < want:
            order = self._order(epoch)
            take = order[pos:pos + want - len(batch)]
            batch += [self.rows[i] for i in take]
            pos += len(take)
            if pos >= len(order):
                epoch, pos = epoch + 1, 0
        self.store.add_prompts(batch)
        self.store.r.hset(self.store.key("feed"), mapping={"epoch": epoch, "pos": pos})
        return len(batch)
