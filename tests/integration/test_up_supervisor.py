"""`treepo up`'s supervisor restarts dead roles with backoff and a budget, and its run directory modes."""

import sys
import time
from pathlib import Path

import pytest

from protocol.config.pipeline import PipelineConfig
from treepo.up import Child, RedisChild, Supervisor, prepare_output

pytestmark = pytest.mark.integration


def test_a_dead_role_is_restarted_with_backoff_until_its_budget_runs_out(tmp_path):
    cfg = PipelineConfig.model_validate({"run": {"max_restarts": 2, "restart_window_s": 60, "restart_backoff_s": 0.2}})
    env = {"PATH": "/usr/bin:/bin"}
    children = {"actor-0": Child("actor-0", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, env),
                "learner": Child("learner", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, env)}
    supervisor = Supervisor(cfg, children)
    said, starts = [], []
    deadline = time.monotonic() + 10
    while supervisor.failed is None:
        assert time.monotonic() < deadline
        said += supervisor.check()
        if children["actor-0"].proc.pid not in starts:
            starts.append(children["actor-0"].proc.pid)
        time.sleep(0.02)
    assert supervisor.failed == "actor-0" and supervisor.restarts() == 2 and len(starts) == 3
    gaps = [b - a for a, b in zip(children["actor-0"].restarts, children["actor-0"].restarts[1:], strict=False)]
    assert gaps[0] >= 0.4  # the second restart waits 0.2 * 2^1 s
    assert any("restarting in" in line for line in said) and "giving up" in said[-1]
    assert children["learner"].alive()  # a live role is left alone
    assert (tmp_path / "actor-0.log").read_text().count("=== treepo up: restart") == 2
    for child in children.values():
        child.stop(timeout_s=5)


def test_a_learner_that_finished_is_not_restarted(tmp_path):
    cfg = PipelineConfig.model_validate({"run": {"restart_backoff_s": 0.1}})
    done = Child("learner", [sys.executable, "-c", "pass"], tmp_path, {"PATH": "/usr/bin:/bin"})
    done.proc.wait()
    supervisor = Supervisor(cfg, {"learner": done})
    time.sleep(0.3)
    assert supervisor.check() == [] and supervisor.check() == [] and supervisor.restarts() == 0


def test_the_embedded_redis_is_restarted_on_its_port_and_aof(tmp_path):
    from buffer.redis_server import EmbeddedRedis

    cfg = PipelineConfig.model_validate({"run": {"restart_backoff_s": 0.1}})
    server = EmbeddedRedis(tmp_path / "redis", password="pw").start()
    client = server.client()
    client.set("tree", b"stored")
    time.sleep(1.5)  # appendfsync everysec: fsynced
    port, first = server.port, server.proc.pid
    supervisor = Supervisor(cfg, {"redis": RedisChild(server)})
    server.kill()
    said = []
    deadline = time.monotonic() + 30
    while not server.alive():
        assert time.monotonic() < deadline
        said += supervisor.check()
        time.sleep(0.02)
    try:
        assert server.proc.pid != first and server.port == port and supervisor.restarts() == 1
        assert client.get("tree") == b"stored"  # the same client reconnects; the AOF was replayed
        assert "redis exited" in said[0] and "redis restarted" in said[-1]
    finally:
        server.stop()


def test_run_directory_modes(tmp_path):
    out = tmp_path / "run"
    assert prepare_output(out, resume=False, fresh=False, force=False) == f"fresh run in {out}"
    with pytest.raises(SystemExit, match="no checkpoint"):
        prepare_output(out, resume=True, fresh=False, force=False)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step30")
    assert "resuming the run" in prepare_output(out, resume=False, fresh=False, force=False)
    assert "step30" in prepare_output(out, resume=True, fresh=False, force=False)
    with pytest.raises(SystemExit, match="--force"):
        prepare_output(out, resume=False, fresh=True, force=False)
    assert out.exists()
    assert "deleted" in prepare_output(out, resume=False, fresh=True, force=True) and not out.exists()


ROLE_WITH_A_HELPER = """
import signal, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # same process group
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
while not stopping:
    time.sleep(0.01)
time.sleep(0.3)  # the role's own shutdown work (a final evaluation) still needs its helper
print("helper alive at shutdown:", helper.poll() is None, flush=True)
helper.terminate()
"""


def test_stop_signals_the_role_which_stops_its_own_helpers(tmp_path):
    """An evaluator's vLLM engine processes share its process group; a SIGTERM to the group killed the
    engine before the evaluator's final evaluation. The role gets the signal, its helpers do not."""
    child = Child("evaluator", [sys.executable, "-c", ROLE_WITH_A_HELPER], tmp_path, {"PATH": "/usr/bin:/bin"})
    time.sleep(1.0)
    assert child.stop(timeout_s=10) == 0
    assert "helper alive at shutdown: True" in (tmp_path / "evaluator.log").read_text()


def test_a_role_that_ignores_stop_is_killed_with_its_group(tmp_path):
    stubborn = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
               "h = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
               "print(h.pid, flush=True); time.sleep(60)"
    child = Child("actor-0", [sys.executable, "-c", stubborn], tmp_path, {"PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 10
    while not (tmp_path / "actor-0.log").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    helper = int((tmp_path / "actor-0.log").read_text().split()[0])
    assert child.stop(timeout_s=1) == -9
    time.sleep(0.2)
    assert not Path(f"/proc/{helper}").exists() or "Z" in Path(f"/proc/{helper}/stat").read_text().split()[2]
