"""deploy/slurm: each sbatch script is valid bash, runs a real `treepo` subcommand whose arguments parse, and
the config it names loads with the TREEPO_* overrides the script exports."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from protocol.config import load_config
from treepo.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "deploy" / "slurm").glob("*.sbatch"))


def filled(text: str) -> str:
    """The script with shell expansions replaced by plausible values (numbers where a number is expected)."""
    text = re.sub(r"\$\(\([^)]*\)\)", "16", text)
    text = re.sub(r"\$\{TREEPO_CONFIG:-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{?(SLURM_NNODES|SLURM_NODEID|SLURM_ARRAY_TASK_ID)(:-[^}]*)?\}?", "1", text)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}?|\$\([^)]*\)", "x", text)


def test_the_three_jobs_exist():
    assert [p.name for p in SCRIPTS] == ["actors.sbatch", "head.sbatch", "learner.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_script_runs_a_real_subcommand_with_a_loading_config(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = filled(script.read_text().replace("\\\n", " "))
    (line,) = [ln for ln in text.splitlines()
               if not ln.lstrip().startswith("#") and re.search(r"\btreepo (buffer|learner|actor)\b", ln)]
    argv = shlex.split(line[line.index("treepo "):].rstrip("'"))[1:]
    args = build_parser(argv).parse_args(argv)
    env = dict(re.findall(r"^export (TREEPO_[A-Z_]+)=\"?([^\"\n]*)\"?", text, re.M))
    cfg = load_config(ROOT / args.config, environ=env)
    if argv[0] == "learner":
        assert args.nnodes == 1 or args.master_addr  # a multi-node learner names its rendezvous
        assert cfg.run.learner_ranks == 16
