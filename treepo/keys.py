"""`treepo keys`: generate a CURVE key pair (Z85) for the `security` section of a config.

Default output is YAML that pastes into a config file:

    security:
      curve_public_key: "..."
      curve_secret_key: "..."

`--format env` prints the same as TREEPO_SECURITY__* environment overrides (values quoted for
the shell and for YAML, since Z85 keys contain characters both would interpret). `--out FILE`
writes the pair to FILE (mode 0600) and prints only the public key, which is what the other side
needs: servers list client keys in `security.authorized_keys`, clients name the server's key in
`security.server_public_key`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex

from protocol.security import generate_keypair


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["yaml", "env"], default="yaml", help="YAML security section, or env overrides")
    p.add_argument("--out", help="write the key pair to this file (mode 0600) and print only the public key")


def render(public: str, secret: str, fmt: str) -> str:
    """The key pair as a YAML `security:` section or as shell `TREEPO_SECURITY__*=` lines."""
    if fmt == "env":
        # the loader parses each override as YAML: a JSON string is a YAML scalar that keeps every Z85 character
        return "".join(f"TREEPO_SECURITY__{name.upper()}={shlex.quote(json.dumps(key))}\n"
                       for name, key in (("curve_public_key", public), ("curve_secret_key", secret)))
    return f"security:\n  curve_public_key: {json.dumps(public)}\n  curve_secret_key: {json.dumps(secret)}\n"


def run(args: argparse.Namespace) -> int:
    public, secret = generate_keypair()
    text = render(public, secret, args.format)
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(public)
    else:
        print(text, end="")
    return 0
