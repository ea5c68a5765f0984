"""vLLM actors stage each pushed version in /dev/shm only when it has room; otherwise on disk, with a warning
naming what /dev/shm would need (a container's default 64 MB /dev/shm cannot hold a 7B model)."""

import logging
import shutil

from actors.vllm_engine import staging_parent


def test_weights_go_to_shared_memory_when_they_fit_and_to_disk_otherwise(tmp_path, caplog):
    free = shutil.disk_usage(tmp_path).free
    assert staging_parent(int(free / 2), shm=tmp_path) == str(tmp_path)
    with caplog.at_level(logging.WARNING, logger="treepo.actor"):
        assert staging_parent(free, shm=tmp_path) is None  # not a quarter to spare
    assert "new versions are staged on disk" in caplog.text and "GiB" in caplog.text
    assert staging_parent(1, shm=tmp_path / "absent") is None
