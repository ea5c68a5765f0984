"""compose.yaml: valid against the Compose Specification schema (vendored, see tests/data/compose-spec.NOTICE.md),
and every treepo service runs a real role with a config that loads (with that service's overrides)."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from protocol.config import load_config

ROOT = Path(__file__).resolve().parents[2]
ROLES = {"buffer", "actor", "learner"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def treepo_services() -> dict[str, dict]:
    return {name: svc for name, svc in compose()["services"].items() if svc.get("image", "").startswith("treepo")}


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with every variable set to 'test'."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:?\-+][^}]*)?\}", "test", value)


def spec_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")  # its $id lacks the '#' jsonschema keys on
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_specification():
    errors = sorted(spec_validator().iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("breakage", ["typo", "bad_devices"])
def test_the_schema_catches_a_broken_file(breakage):
    broken = compose()
    actor = broken["services"]["actor"]
    if breakage == "typo":
        actor["comand"] = actor.pop("command")
    else:
        actor["deploy"]["resources"]["reservations"]["devices"] = "all"
    assert list(spec_validator().iter_errors(broken))


@pytest.mark.parametrize("name", sorted(treepo_services()))
def test_each_service_runs_a_role_with_a_valid_config(name):
    svc = treepo_services()[name]
    cmd = svc["command"]
    assert cmd[0] in ROLES, cmd  # the image's entry point is `treepo`
    config = cmd[cmd.index("--config") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    host_dir = mounts[str(Path(config).parent)]
    path = ROOT / host_dir / Path(config).name
    assert path.is_file() and path.parent == ROOT / "configs", path
    env = {k: interpolate(str(v)) for k, v in svc.get("environment", {}).items()}
    load_config(path, environ=env)  # raises ConfigError naming any bad field or override


def test_every_role_is_present_and_actors_scale_on_gpus():
    services = compose()["services"]
    assert {svc["command"][0] for svc in treepo_services().values()} == ROLES
    actor, learner = services["actor"], services["learner"]
    assert actor["deploy"]["replicas"] >= 1
    assert "container_name" not in actor and "ports" not in actor  # `--scale actor=N` needs both absent
    for svc in (actor, learner):
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_redis_is_durable_and_password_protected():
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "REDIS_PASSWORD" in redis["environment"]
    assert compose()["services"]["buffer"]["depends_on"]["redis"]["condition"] == "service_healthy"
