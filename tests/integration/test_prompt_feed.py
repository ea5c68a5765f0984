import json

import pytest

from buffer.prompt_feed import PromptFeed
from buffer.store import TreeStore
from protocol.config.prompts import PromptsConfig

pytestmark = pytest.mark.integration


def test_feed_tops_up_epoch_after_epoch_and_resumes(redis_client, tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(5)))
    store = TreeStore(redis_client, "feed-run")
    cfg = PromptsConfig(source="jsonl", path=str(rows), seed=3)
    feed = PromptFeed(store, cfg, low_water=3)
    assert feed.top_up() == 6  # 2 x low_water: one whole epoch of 5 and the first of the next
    assert feed.top_up() == 0
    queued = store.queued_prompts()
    assert sorted(queued[:5]) == sorted(r.prompt_id for r in feed.rows)  # epoch 0 is a permutation
    redis_client.ltrim(store.key("prompts"), 5, -1)  # 5 dealt, 1 left
    again = PromptFeed(store, cfg, low_water=3)  # a restarted buffer goes on where the feed stood
    assert again.top_up() == 5
    now = store.queued_prompts()
    assert now[0] == queued[5] and len(now) == 6
    assert sorted(now[:5]) == sorted(r.prompt_id for r in feed.rows)  # epoch 1, resumed at position 1
