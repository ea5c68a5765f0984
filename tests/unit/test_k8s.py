"""deploy/k8s: every manifest is valid Kubernetes (kubernetes-validate, strict: unknown fields are errors), and
every treepo container runs a real subcommand whose config loads with the container's TREEPO_* environment
(secrets filled with a real CURVE key pair), as the compose test does."""

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
import zmq

from protocol.config import load_config
from treepo.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers() -> list[tuple[str, dict]]:
    return [(f"{name}:{doc['metadata']['name']}", c) for name, doc in documents()
            if doc["kind"] in ("Deployment", "StatefulSet") for c in doc["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith("treepo")]


def secret_values() -> dict[str, str]:
    server, client = zmq.curve_keypair(), zmq.curve_keypair()
    return {"REDIS_PASSWORD": "test", "POD_NAME": "actor-5d9c7-x2x4q",
            "CURVE_SERVER_PUBLIC": server[0].decode(), "CURVE_SERVER_SECRET": server[1].decode(),
            "CURVE_CLIENT_PUBLIC": client[0].decode(), "CURVE_CLIENT_SECRET": client[1].decode()}


def expand(value: str, known: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: known[m.group(1)], value)


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_every_manifest_is_valid_kubernetes(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_roles_and_what_a_cluster_needs_are_there():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}
    assert {("StatefulSet", "redis"), ("Service", "buffer"), ("Deployment", "actor"), ("StatefulSet", "learner"),
            ("Service", "learner"), ("Deployment", "buffer")} <= kinds
    (redis,) = [doc for _, doc in documents() if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "redis"]
    assert redis["spec"]["volumeClaimTemplates"] and "--requirepass" in " ".join(
        redis["spec"]["template"]["spec"]["containers"][0]["command"])
    (learner,) = [doc for _, doc in documents() if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "learner"]
    assert learner["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


@pytest.mark.parametrize(("name", "container"), containers(), ids=lambda x: x if isinstance(x, str) else "")
def test_each_container_runs_a_role_with_a_valid_secured_config(name, container):
    known = secret_values()
    env = {}
    for item in container["env"]:
        if "value" in item:
            known[item["name"]] = expand(item["value"], known)
            if item["name"].startswith("TREEPO_"):
                env[item["name"]] = known[item["name"]]
    argv = [expand(a, known) for a in container["args"]]
    assert argv[0] in SUBCOMMANDS and argv[0] in {"buffer", "actor", "learner"}
    args = build_parser(argv).parse_args(argv)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(Path(args.config).parent)] == "config"  # the ConfigMap made from configs/
    cfg = load_config(ROOT / "configs" / Path(args.config).name, environ=env)
    assert cfg.security.curve_public_key and cfg.buffer.redis_password == "test"
    if argv[0] == "actor":
        assert cfg.security.server_public_key == known["CURVE_SERVER_PUBLIC"] and args.actor_id == known["POD_NAME"]
    else:
        assert cfg.security.authorized_keys == [known["CURVE_CLIENT_PUBLIC"]]
