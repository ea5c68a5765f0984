import os
import shlex
import subprocess
import sys

import yaml
import zmq

from protocol.codec import decode, encode
from protocol.config import load_config
from protocol.config.transport import SecurityConfig
from protocol.messages import Heartbeat
from protocol.security import is_enabled, secure_client, secure_server, stop_authenticator
from treepo.cli import main


def keys_yaml(capsys) -> SecurityConfig:
    assert main(["keys"]) == 0
    return SecurityConfig.model_validate(yaml.safe_load(capsys.readouterr().out)["security"])


def test_printed_keys_secure_a_real_connection(capsys):
    server, client = keys_yaml(capsys), keys_yaml(capsys)
    assert is_enabled(server) and is_enabled(client) and server.curve_public_key != client.curve_public_key
    server.authorized_keys = [client.curve_public_key]
    client.server_public_key = server.curve_public_key
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.linger = dealer.linger = 0
    secure_server(router, server, ctx)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    secure_client(dealer, client)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(encode(Heartbeat(sender="a")))
    assert router.poll(3000) and decode(router.recv_multipart()[1]).sender == "a"
    router.close()
    dealer.close()
    stop_authenticator(ctx)
    ctx.term()


def test_env_format_loads_as_config_overrides():
    out = subprocess.run([sys.executable, "-m", "treepo.cli", "keys", "--format", "env"], check=True,
                         capture_output=True, text=True).stdout
    environ = dict(shlex.split(line)[0].split("=", 1) for line in out.splitlines())
    assert set(environ) == {"TREEPO_SECURITY__CURVE_PUBLIC_KEY", "TREEPO_SECURITY__CURVE_SECRET_KEY"}
    cfg = load_config(environ=environ)
    assert is_enabled(cfg.security)


def test_out_file_is_private_and_stdout_has_the_public_key(tmp_path, capsys):
    path = tmp_path / "actor.key.yaml"
    assert main(["keys", "--out", str(path)]) == 0
    public = capsys.readouterr().out.strip()
    assert os.stat(path).st_mode & 0o777 == 0o600
    cfg = load_config(path, environ={})
    assert cfg.security.curve_public_key == public and is_enabled(cfg.security)
