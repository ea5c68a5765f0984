"""Session fixtures shared by every test area. Area-specific fixtures live in tests/fixtures/<area>.py
and are registered here through pytest_plugins."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [f"tests.fixtures.{p.stem}" for p in sorted((Path(__file__).parent / "fixtures").glob("[a-z]*.py"))]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, built once per test session."""
    from treepo.models import tiny_model

    return tiny_model(tmp_path_factory.mktemp("models") / "tiny")
