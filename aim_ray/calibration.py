"""Calibration for AIM: the calibration blocks, a pipeline stage runner, activation and sensitivity scales.

Data (DESIGN.md section 1, the AWQ recipe the paper uses): `mit-han-lab/pile-val-backup`, split `validation`,
`shuffle(seed=42)`; each text's `strip()` is tokenised with the base tokenizer (default special tokens); texts
longer than `block_size` tokens and empty ones are skipped; the first `n_samples` kept texts are concatenated
and cut into `len // block_size` blocks (remainder dropped), optionally capped at `n_blocks`. Local
`.jsonl`/`.json` (field `text`), `.txt` (one sample per line) and `.parquet` files, and local dataset
directories, go through `datasets` too, so the permutation is the very one the hub path gets for the same
rows.

`StageRunner` builds only decoder layers [a, b) of a Llama / Mistral / Qwen2 causal LM (plus the embedding for
the first stage, final norm + lm_head for the last) from a meta-device skeleton and loads only those weights.
Scale collection hooks every weight-bearing non-embedding module of a stage and records the mean |input| per
channel, accumulated in float32 over all tokens. Chaining stages reproduces the full model (same modules, same
rotary embedding and causal masks), so the union of the stages' scales equals hooking the full model.

Sensitivity (eq. 5): `G = sum over blocks b of |d H_b / d theta|` where `H_b` is the mean over the block's
tokens of the entropy of softmax(logits). The per-block mean only rescales every block by the same
1/block_size, which the per-tensor max normalisation removes. One block per backward pass (the |.| is per
block). `SensitivityStage` splits it by layer range: a stage keeps its input hidden states, hands its output
on, and later gets the gradient of that output, recomputes its forward with autograd, backpropagates through
its own layers only, adds |grad| of its parameters and returns the gradient of its input. The ops are those of
the whole-model backward, so any chain of stages gives the very scales one stage does. With tied embeddings
the head gets its own gradient (the embedding use is excluded), because the tied tensor is relaxed as the head.

Compute device and dtype (`resolve_compute`): `auto` is cuda + bfloat16 where this process may use a GPU
(`torch.cuda.is_available()` and, inside a Ray worker, a GPU id assigned), else cpu + float32. Whatever the
compute dtype, the scale statistics (sums of |x|, of |grad|) accumulate in float32. float16 is allowed on a
CPU with a warning: CPUs without float16 matmul run it ~50x slower than float32 (bfloat16 is the fast
half-precision choice there). The compute dtype is part of the cache key (bfloat16 scales differ from float32
ones by ~1e-2 relative); the device is not: float32 on cpu and on cuda differ only by float32 summation order
(~1e-6 relative), far below what a relaxation factor in [omega, 1] can show, so one float32 calibration
serves both. The artifact's metadata records both.

Differences from the reference implementation: it accumulates scales in bfloat16 (we use float32, whatever the
compute dtype), it does not check the checkpoint's vocabulary/shape against the config (we refuse mismatches),
and it treats an empty text as a one-token (BOS) sample (we skip texts that are empty after `strip()`).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .architectures import input_embedding, num_layers
from .checkpoint import TOKENIZER_FILES, Checkpoint, parse_dtype, sha256_file
from .errors import CalibrationError, CheckpointError
from .scales import Scales, cache_key, cache_path, is_embedding, open_checkpoint

DEFAULT_DATASET = "mit-han-lab/pile-val-backup"
DEFAULT_SPLIT = "validation"
SHUFFLE_SEED = 42
# Families whose decoder layers the stage runner chains (same layer call, rotary module and masks as the full
# model: checked bit-identical). Any other causal LM is calibrated whole, in one stage (`calibration_stages`).
PIPELINED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
SUPPORTED_MODEL_TYPES = PIPELINED_MODEL_TYPES  # older name
ONE_STAGE_NOTE = ("AIM calibration: model_type {family!r} has no pipelined stage runner (pipelined: {pipelined}); "
                  "the full model is hooked in one stage{where}")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}

# ------------------------------------------------------------------------------------------------------ data


def load_text_dataset(dataset: str, split: str = DEFAULT_SPLIT):
    """A `datasets.Dataset` with a `text` column: a local file, a local dataset directory or a hub id."""
    import datasets

    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise CalibrationError(f"{path}: unsupported calibration file type {path.suffix!r}; "
                                       f"use one of {sorted(_FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif not path.is_dir() and (path.suffix.lower() in _FILE_BUILDERS or _looks_local(dataset)):
            raise CalibrationError(f"{dataset}: calibration file not found")
        else:  # a hub id or a local dataset directory laid out like one (e.g. val.jsonl -> split validation)
            ds = datasets.load_dataset(dataset, split=split)
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 - offline hub, bad file, unknown split: one clear message
        raise CalibrationError(f"cannot load calibration dataset {dataset!r} (split {split!r}): "
                               f"{type(e).__name__}: {e}. Offline? Pass a local "
                               f".jsonl/.json/.txt/.parquet file.") from None
    if "text" not in ds.column_names:
        raise CalibrationError(f"calibration dataset {dataset!r} has no 'text' field "
                               f"(columns: {ds.column_names})")
    return ds


def _looks_local(dataset: str) -> bool:
    return dataset.startswith((".", "/", "~"))


def tokenize_blocks(texts: Iterator[str | None], tokenizer: Any, n_samples: int = 256, block_size: int = 512,
                    n_blocks: int | None = None, source: str = "calibration data") -> torch.Tensor:
    """The AWQ recipe on already-ordered texts -> LongTensor [n_blocks, block_size]."""
    _check_positive(n_samples=n_samples, block_size=block_size, n_blocks=n_blocks)
    ids: list[int] = []
    kept = 0
    enough = n_blocks * block_size if n_blocks is not None else None
    for text in texts:
        text = (text or "").strip()
        if not text:
            continue
        encoded = tokenizer.encode(text)
        if len(encoded) > block_size or not encoded:
            continue
        ids.extend(encoded)
        kept += 1
        # The first n_blocks blocks only depend on the first n_blocks * block_size ids: stop early.
        if kept == n_samples or (enough is not None and len(ids) >= enough):
            break
    count = len(ids) // block_size
    if count == 0:
        raise CalibrationError(f"{source}: found only {len(ids)} tokens in {kept} usable texts, fewer than "
                               f"one block of block_size={block_size}; use more/longer texts or a smaller "
                               f"block_size")
    count = min(count, n_blocks) if n_blocks is not None else count
    return torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)


def load_calibration_blocks(tokenizer: Any, dataset: str = DEFAULT_DATASET, n_samples: int = 256,
                            block_size: int = 512, n_blocks: int | None = None,
                            split: str = DEFAULT_SPLIT) -> torch.Tensor:
    """Calibration blocks `[n_blocks, block_size]` (int64). `tokenizer` may be a path / model directory."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    ds = load_text_dataset(str(dataset), split).shuffle(seed=SHUFFLE_SEED)
    texts = (row["text"] for row in ds.select_columns(["text"]))
    return tokenize_blocks(texts, tokenizer, n_samples, block_size, n_blocks, source=str(dataset))


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise CalibrationError(f"{path}: cannot load the base tokenizer ({type(e).__name__}: {e})") from None


def dataset_fingerprint(dataset: str, split: str = DEFAULT_SPLIT) -> str:
    """What identifies the calibration texts in a cache key: a local file's sha256, else the id and split."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return f"file:{sha256_file(path)}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        digest = hashlib.sha256("".join(f"{p.relative_to(path)}:{sha256_file(p)}\n" for p in files).encode())
        return f"dir:{digest.hexdigest()}:{split}"
    return f"hub:{dataset}:{split}"


def _check_positive(**values: int | None) -> None:
    for option, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise CalibrationError(f"calibration.{option} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------- device, dtype

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_warned_fp16_cpu: list[bool] = []


def check_device(device: str | torch.device) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N` (syntax only; `resolve_compute` checks a GPU is there)."""
    text = str(device).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise CalibrationError(f"calibration.device (--device) must be auto, cpu, cuda or cuda:N, got {device!r}")
    return text


def check_dtype(dtype: str | torch.dtype) -> str:
    """`auto` or a compute dtype name (aliases fp32/bf16/fp16 accepted)."""
    text = str(dtype).strip().lower().removeprefix("torch.")
    text = _DTYPE_ALIASES.get(text, text)
    if text != "auto" and text not in COMPUTE_DTYPES:
        raise CalibrationError(f"calibration.dtype (--dtype) must be auto, {', '.join(COMPUTE_DTYPES)}, "
                               f"got {dtype!r}")
    return text


def cuda_usable() -> bool:
    """May this process compute on a GPU: CUDA is available and, inside a Ray worker, a GPU id is assigned
    (a worker without one must not grab the node's GPU 0)."""
    if not torch.cuda.is_available():
        return False
    ray = sys.modules.get("ray")  # never import Ray for this: the single-process path does not use it
    if ray is not None and ray.is_initialized():
        worker = getattr(ray.get_runtime_context(), "worker", None)
        if getattr(worker, "mode", None) == ray.WORKER_MODE:
            return bool(ray.get_gpu_ids())
    return True


def resolve_device(device: str | torch.device = "auto", cuda: bool | None = None) -> str:
    """The device to compute on: `auto` -> cuda when usable else cpu; a cuda device needs a usable GPU."""
    device = check_device(device)
    cuda = cuda_usable() if cuda is None else cuda
    if device == "auto":
        return "cuda" if cuda else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not cuda:
            raise CalibrationError(f"calibration.device (--device) {device!r}: no CUDA GPU is usable here; "
                                   f"use --device cpu or auto")
        if index >= torch.cuda.device_count():
            raise CalibrationError(f"calibration.device (--device) {device!r}: only "
                                   f"{torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(dtype: str | torch.dtype, devices: Sequence[str]) -> str:
    """`auto` -> bfloat16 when every device is a GPU, else float32. Warns on float16 on a CPU."""
    dtype = check_dtype(dtype)
    if dtype == "auto":
        return "bfloat16" if devices and all(d.startswith("cuda") for d in devices) else "float32"
    if dtype == "float16" and any(d == "cpu" for d in devices) and not _warned_fp16_cpu:
        _warned_fp16_cpu.append(True)  # once per process: cached_calibrate and calibrate both resolve
        warnings.warn("calibration.dtype float16 on a CPU: most CPUs have no float16 matmul (measured ~50x "
                      "slower than float32); bfloat16 or float32 are the CPU choices", stacklevel=3)
    return dtype


def resolve_compute(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                    cuda: bool | None = None) -> tuple[str, str]:
    """(device, dtype name) this process calibrates with; see the module docstring for `auto`."""
    resolved = resolve_device(device, cuda)
    return resolved, resolve_dtype(dtype, [resolved])


def device_kind(device: str | torch.device) -> str:
    """`cuda` for any `cuda:N`: what the artifact's metadata records."""
    return str(device).partition(":")[0]


# ------------------------------------------------------------------------------------------------ stages


def _hf_config(ckpt: Checkpoint, attn_implementation: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(ckpt.path))
    except Exception as e:  # noqa: BLE001 - an unknown model_type: one clear line
        raise CalibrationError(f"{ckpt.path / 'config.json'}: transformers cannot build model_type "
                               f"{ckpt.config.get('model_type')!r} for calibration "
                               f"({type(e).__name__}: {_first_line(e)})") from None
    config._attn_implementation = attn_implementation
    return config


def _first_line(error: BaseException) -> str:
    """transformers' errors can list every supported class: keep the first line, at most 160 characters."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if len(text) <= 160 else text[:157] + "..."


def _from_config(auto: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """`auto.from_config`, in eager attention for a family without SDPA (Gemma 2: its soft-capping), as the
    full model itself would be loaded."""
    try:
        return auto.from_config(config, dtype=dtype)
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        config._attn_implementation = "eager"
        return auto.from_config(config, dtype=dtype)


class StageRunner:
    """Decoder layers [layer_start, layer_end) of a causal LM, with only their weights loaded.

    The first stage also owns `model.embed_tokens` and takes token ids; the last owns `model.norm` and
    `lm_head` and returns logits; every other stage maps hidden states to hidden states. Module names are the
    full HF names, so scales from different stages combine into one artifact.
    """

    def __init__(self, checkpoint: str | os.PathLike | Checkpoint, layer_start: int, layer_end: int,
                 is_first: bool | None = None, is_last: bool | None = None,
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa", whole: bool | None = None) -> None:
        self.checkpoint = open_checkpoint(checkpoint)
        self.config = _hf_config(self.checkpoint, attn_implementation)
        n_layers = num_layers(self.checkpoint.config, self.checkpoint.names())
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first = layer_start == 0 if is_first is None else is_first
        self.is_last = layer_end == n_layers if is_last is None else is_last
        if not (0 <= layer_start <= layer_end <= n_layers) or not (
                layer_start < layer_end or self.is_first or self.is_last):
            raise CalibrationError(f"stage layers [{layer_start}, {layer_end}) are not a valid range of the "
                                   f"{n_layers} decoder layers of {self.checkpoint.path}")
        # A family without a stage runner runs as one whole model (and only as the whole model); `whole=True`
        # runs a pipelined family that way too (the transformers forward itself).
        self.whole = not is_pipelined(self.checkpoint) if whole is None else whole
        if self.whole and not (self.is_first and self.is_last and (layer_start, layer_end) == (0, n_layers)):
            raise CalibrationError(f"{self.checkpoint.path}: model_type "
                                   f"{self.checkpoint.config.get('model_type')!r} has no pipelined stage runner; "
                                   f"it calibrates in one stage (layers [0, {n_layers}))")
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.modules = self._build()
        self._recorder: ActivationRecorder | None = None

    # -- construction -------------------------------------------------------------------------------------
    def _build(self) -> dict[str, nn.Module]:
        from transformers import AutoModelForCausalLM

        if self.whole:
            return self._build_whole()
        if getattr(self.config, "use_bidirectional_attention", False):
            raise CalibrationError(f"{self.checkpoint.path}: bidirectional attention is not supported by the "
                                   f"calibration stages")
        with torch.device("meta"):  # a skeleton that costs no memory; only owned modules get real weights
            skeleton = _from_config(AutoModelForCausalLM, self.config, self.dtype)
        self.config = skeleton.config
        owned: dict[str, nn.Module] = {}
        if self.is_first:
            owned["model.embed_tokens"] = skeleton.model.embed_tokens
        for i in range(self.layer_start, self.layer_end):
            owned[f"model.layers.{i}"] = skeleton.model.layers[i]
        if self.is_last:
            owned["model.norm"] = skeleton.model.norm
            owned["lm_head"] = skeleton.lm_head
        for prefix, module in owned.items():
            self._materialize(prefix, module)
        # Non-persistent buffers (inv_freq) are computed at init: build the rotary module for real.
        self.rotary_emb = type(skeleton.model.rotary_emb)(config=self.config).to(self.device)
        return owned

    def _build_whole(self) -> dict[str, nn.Module]:
        """The full causal LM with every weight from the checkpoint (a family without a stage runner). Built
        without weight initialisation (all parameters are then loaded); buffers are computed at init. Every
        parameter must be a checkpoint tensor of the same name and shape: a family whose transformers modules
        are renamed or fused against its checkpoint (e.g. MoE experts fused into one tensor) is refused."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        try:
            with no_init_weights(), self.device:
                model = _from_config(AutoModelForCausalLM, self.config, self.dtype)
        except Exception as e:  # noqa: BLE001
            raise CalibrationError(f"{self.checkpoint.path}: transformers cannot build a causal LM of model_type "
                                   f"{self.checkpoint.config.get('model_type')!r} "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
        self.config = model.config
        stored = set(self.checkpoint.names())
        for pname, _ in list(model.named_parameters(remove_duplicate=False)):
            if pname not in stored and not self._tied_head(pname):
                raise CalibrationError(f"{self.checkpoint.path}: parameter {pname!r} of the transformers "
                                       f"{type(model).__name__} is not a tensor of the checkpoint (renamed or fused "
                                       f"weights); this family cannot be calibrated")
        self._materialize("", model, remove_duplicate=False)
        return {"": model}

    def _tied_head(self, pname: str) -> bool:
        return pname.endswith("lm_head.weight") and bool(self.config.tie_word_embeddings)

    def _materialize(self, prefix: str, module: nn.Module, remove_duplicate: bool = True) -> None:
        for pname, meta_param in list(module.named_parameters(remove_duplicate=remove_duplicate)):
            full = f"{prefix}.{pname}" if prefix else pname
            tensor = self._read(full, tuple(meta_param.shape))
            owner, _, leaf = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            setattr(target, leaf, nn.Parameter(tensor.to(self.device, self.dtype), requires_grad=False))
        for bname, buf in list(module.named_buffers()):
            owner, _, leaf = bname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            if buf.is_meta and leaf == "embed_scale" and hasattr(target, "scalar_embed_scale"):
                # Gemma's scaled embedding: sqrt(hidden) in the buffer's dtype, as transformers initialises it
                target.register_buffer(leaf, torch.tensor(target.scalar_embed_scale, dtype=buf.dtype,
                                                          device=self.device), persistent=False)
            elif buf.is_meta:
                raise CalibrationError(f"{prefix}.{bname}: buffer cannot be loaded from "
                                       f"{self.checkpoint.path}")
        module.eval()

    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        source = name
        if self._tied_head(name):
            # as transformers does: the head is the embedding (its own Parameter here, for a head-only gradient)
            source = input_embedding(self.checkpoint.names()) or name
        try:
            tensor = self.checkpoint.read(source)
        except CheckpointError as e:
            raise CalibrationError(f"cannot load {name} for calibration: {e}") from None
        if tuple(tensor.shape) != shape:
            raise CalibrationError(f"{self.checkpoint.path}: tensor {source!r} has shape "
                                   f"{tuple(tensor.shape)}, but config.json implies {shape}")
        return tensor

    # -- running ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, T]` (first stage) or hidden states `[B, T, H]` -> hidden states or logits (last)."""
        with torch.inference_mode():
            return self.run(x)

    __call__ = forward

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without inference mode (autograd works: the sensitivity scales use it)."""
        if self.whole:
            return self._run_whole(x)
        h = self._embed(x)
        if self.layer_end > self.layer_start:
            position_ids = torch.arange(h.shape[1], device=self.device).unsqueeze(0)
            position_embeddings = self._position_embeddings(h, position_ids)
            masks = self._masks(h, position_ids)
            for i in range(self.layer_start, self.layer_end):
                h = self.modules[f"model.layers.{i}"](
                    h, attention_mask=masks[self._layer_type(i)], position_ids=position_ids,
                    use_cache=False, position_embeddings=position_embeddings[self._layer_type(i)])
        if self.is_last:
            h = self.modules["lm_head"](self.modules["model.norm"](h))
            cap = getattr(self.config, "final_logit_softcapping", None)
            if cap is not None:  # Gemma 2/3: as their ForCausalLM.forward
                h = torch.tanh(h / cap) * cap
        return h

    def _position_embeddings(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        """Rotary (cos, sin) per attention layer type: Gemma 3 has one rotary frequency per type, the others
        one for every layer."""
        import inspect

        types = {self._layer_type(i) for i in range(self.layer_start, self.layer_end)}
        if "layer_type" in inspect.signature(self.rotary_emb.forward).parameters:
            return {t: self.rotary_emb(h, position_ids, t) for t in types}
        shared = self.rotary_emb(h, position_ids)
        return dict.fromkeys(types, shared)

    def _run_whole(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2:
            raise CalibrationError(f"the first stage takes token ids [batch, seq], got {x.dtype} {tuple(x.shape)}")
        return self.modules[""](input_ids=x.to(self.device), use_cache=False).logits

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2:
                raise CalibrationError(f"the first stage takes token ids [batch, seq], got {x.dtype} "
                                       f"{tuple(x.shape)}")
            return self.modules["model.embed_tokens"](x.to(self.device))
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise CalibrationError(f"stage [{self.layer_start}, {self.layer_end}) takes hidden states "
                                   f"[batch, seq, {self.config.hidden_size}], got {tuple(x.shape)}")
        return x.to(self.device, self.dtype)

    def _layer_type(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[i]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def _masks(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
        """The masks the full model would build (no padding: calibration blocks are full length)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        builders: dict[str, Callable] = {"full_attention": create_causal_mask,
                                         "sliding_attention": create_sliding_window_causal_mask}
        masks = {}
        for kind in {self._layer_type(i) for i in range(self.layer_start, self.layer_end)}:
            if kind not in builders:
                raise CalibrationError(f"{self.checkpoint.path}: attention layer type {kind!r} is not "
                                       f"supported")
            masks[kind] = builders[kind](config=self.config, inputs_embeds=h, attention_mask=None,
                                         position_ids=position_ids, **_no_cache(builders[kind]))
        return masks

    # -- scales -------------------------------------------------------------------------------------------
    def scaled_modules(self) -> dict[str, nn.Module]:
        """Every weight-bearing non-embedding module (Linear incl. lm_head, norms), by full HF name."""
        out = {}
        for prefix, owned in self.modules.items():
            for sub, module in owned.named_modules():
                name = ".".join(p for p in (prefix, sub) if p)
                if module._parameters.get("weight") is not None and not is_embedding(name):
                    out[name] = module
        return out

    def relaxed_parameters(self) -> dict[str, nn.Parameter]:
        """This stage's relaxed parameters (every `.weight` but embeddings), by full HF name, set to require
        gradients. `lm_head` is its own Parameter even when tied: it gets its head-only gradient."""
        params = {}
        for prefix, module in self.modules.items():
            for pname, p in module.named_parameters(remove_duplicate=False):
                name = f"{prefix}.{pname}" if prefix else pname
                if name.endswith(".weight") and not is_embedding(name):
                    params[name] = p.requires_grad_(True)
        return params

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every floating-point parameter of this stage (embeddings and biases too), by full HF name, set to
        require gradients: what a Fisher or a mask covers. A tied `lm_head` is its own Parameter here."""
        params = {}
        for prefix, module in self.modules.items():
            for pname, p in module.named_parameters(remove_duplicate=False):
                if p.is_floating_point():
                    params[f"{prefix}.{pname}" if prefix else pname] = p.requires_grad_(True)
        return params

    def start_recording(self, recorder: type | None = None) -> None:
        """Hook this stage's modules; every later forward adds its tokens to the scales (or, with another
        `recorder` class such as `statistics.GramRecorder`, to its statistics)."""
        self.stop_recording()
        self._recorder = (recorder or ActivationRecorder)(self.scaled_modules())

    @property
    def recorder(self) -> Any:
        return self._recorder

    def scales(self) -> dict[str, torch.Tensor]:
        if self._recorder is None:
            raise CalibrationError("scales requested from a stage that is not recording "
                                   "(call start_recording first)")
        return self._recorder.means()

    def stop_recording(self) -> dict[str, torch.Tensor] | None:
        """Remove the hooks; return the scales recorded so far (None if not recording)."""
        if self._recorder is None:
            return None
        recorder, self._recorder = self._recorder, None
        recorder.remove()
        return recorder.means() if recorder.count else None


class InputRecorder:
    """Forward pre-hooks that hand each hooked module's input to `add(name, x)`: what the scales and the
    experts' statistics (`statistics.GramRecorder`) accumulate. `sums` / `counts` per module name."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, m in modules.items() if self.records(m)]

    @staticmethod
    def records(module: nn.Module) -> bool:
        return True

    def add(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.add(name, args[0] if args else next(iter(kwargs.values())))

        return record

    def _accumulate(self, name: str, total: torch.Tensor, tokens: int) -> None:
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0) + tokens

    @property
    def count(self) -> int:
        return max(self.counts.values(), default=0)

    def means(self) -> dict[str, torch.Tensor]:
        return {name: (s / self.counts[name]).cpu() for name, s in self.sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ActivationRecorder(InputRecorder):
    """Sum over tokens of |input| per channel (float32) and the token count."""

    def add(self, name: str, x: torch.Tensor) -> None:
        # abs is exact in any dtype; the sum accumulates in float32 without a float32 copy of x.
        total = torch.sum(x.detach().abs(), dim=tuple(range(x.dim() - 1)), dtype=torch.float32)
        self._accumulate(name, total, x.numel() // x.shape[-1])


def backprop_blocks(stages: Sequence[Any], blocks: torch.Tensor, desc: str, labels: bool = False) -> None:
    """Every block, one at a time, forward through the chained stages (in process) and backward again: what
    the Ray pipeline does per stage. `labels`: the last stage gets the block's token ids (next-token losses)."""
    for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=None, leave=False)):
        x = block.unsqueeze(0)
        for stage in stages[:-1]:
            x = stage.forward(i, x)
        grad = stages[-1].last(x, block.unsqueeze(0) if labels else None)
        for stage in reversed(stages[:-1]):
            grad = stage.backward(i, grad)


FP16_LOSS_SCALE = 1024.0


class SensitivityStage:
    """The sensitivity scales of one `StageRunner`: sum over blocks of |d entropy / d theta| (float32).

    One block per call. A stage that is not last: `forward(key, x)` keeps `x` and returns the stage's output;
    `backward(key, grad_out)` recomputes the forward with autograd, backpropagates `grad_out` through this
    stage only, adds |grad| of its parameters, and returns the gradient of `x` (None for the first stage). The
    last stage does both at once in `last(x)`, starting from the entropy loss. Keeping `x` instead of the
    autograd graph bounds the memory by the blocks in flight times one hidden state, at the cost of a second
    forward; the recomputed forward is the same op sequence, so nothing changes in the result.

    float16 has too little range below 1 for these gradients (on a tiny Llama with 64-token blocks, 0.05% of
    them underflowed to 0 and the worst error was 12% of the tensor's max): the loss is scaled by
    `FP16_LOSS_SCALE` (a power of two, so dividing the float32 sums back is exact) and the worst error drops to
    0.4%. An overflow shows as non-finite scales, which `check_finite` refuses. bfloat16 has float32's range.
    """

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.loss_scale = FP16_LOSS_SCALE if runner.dtype == torch.float16 else 1.0
        self.params = self._parameters(runner)
        self.sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                     for name, p in self.params.items()}
        self._inputs: dict[int, torch.Tensor] = {}
        self.blocks = 0

    def forward(self, key: int, x: torch.Tensor) -> torch.Tensor:
        if self.runner.is_last:
            raise CalibrationError("the last sensitivity stage runs forward and backward at once: call last()")
        self._inputs[key] = x
        return self.runner.forward(x)

    def backward(self, key: int, grad_out: torch.Tensor) -> torch.Tensor | None:
        if key not in self._inputs:
            raise CalibrationError(f"stage [{self.runner.layer_start}, {self.runner.layer_end}): no forward "
                                   f"kept for block {key} (worker restarted?)")
        return self._backprop(self._inputs.pop(key), grad_out)

    def last(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward and backward of the stage that owns lm_head; `labels`: the block's token ids, for losses
        that need them (the entropy does not)."""
        if not self.runner.is_last:
            raise CalibrationError("last() is for the stage that owns lm_head")
        return self._backprop(x, None, labels)

    # What a subclass changes: the parameters it follows, the loss at the head, what a gradient adds.
    @staticmethod
    def _parameters(runner: StageRunner) -> dict[str, nn.Parameter]:
        return runner.relaxed_parameters()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return entropy_loss(logits)

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        self.sums[name] += grad.abs().float()

    def _backprop(self, x: torch.Tensor, grad_out: torch.Tensor | None,
                  labels: torch.Tensor | None = None) -> torch.Tensor | None:
        runner = self.runner
        wants_input = not runner.is_first
        if wants_input:  # a fresh leaf (x may be an inference tensor or a read-only wire buffer)
            x = x.detach().to(runner.device, runner.dtype).clone().requires_grad_(True)
        inputs = [*self.params.values(), *([x] if wants_input else [])]
        self.blocks += 1
        if not inputs:  # e.g. a first stage that holds only the embedding
            return None
        with torch.enable_grad():
            out = runner.run(x)
            if grad_out is None:
                loss = self._loss(out, labels)
                target, seed = (loss * self.loss_scale if self.loss_scale != 1.0 else loss), None
            else:
                target, seed = out, grad_out.to(out.device, out.dtype)
            grads = torch.autograd.grad(target, inputs, grad_outputs=seed)
        for name, g in zip(self.params, grads, strict=False):
            self._accumulate(name, g)
        return grads[-1].detach() if wants_input else None

    def scales(self) -> dict[str, torch.Tensor]:
        return {name: (g / self.loss_scale if self.loss_scale != 1.0 else g).cpu() for name, g in self.sums.items()}


def _no_cache(mask_builder: Callable) -> dict[str, None]:
    """The mask builders' no-KV-cache argument: `cache` since transformers 5.24, `past_key_values` before
    (deprecated in 5.24, removed in 5.40)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(mask_builder).parameters else "past_key_values": None}


def iter_micro_batches(blocks: torch.Tensor, micro_batch: int) -> Iterator[torch.Tensor]:
    _check_positive(micro_batch=micro_batch)
    for start in range(0, blocks.shape[0], micro_batch):
        yield blocks[start:start + micro_batch]


# ---------------------------------------------------------------------------------------------- collection


def is_pipelined(ckpt: Checkpoint) -> bool:
    """Whether the stage runner can split this family by layer range (else: one stage, the whole model)."""
    return ckpt.config.get("model_type") in PIPELINED_MODEL_TYPES


def calibration_stages(ckpt: Checkpoint, layer_ranges: Sequence[tuple[int, int]] | None, where: str = ""
                       ) -> list[tuple[int, int]]:
    """The stages to calibrate `ckpt` with: `layer_ranges` (checked), or one whole-model stage with a warning
    naming the family when it has no pipelined stage runner."""
    n_layers = num_layers(ckpt.config, ckpt.names())
    if not is_pipelined(ckpt):
        warnings.warn(one_stage_note(ckpt, where), stacklevel=3)
        return [(0, n_layers)]
    return _stage_ranges(n_layers, layer_ranges)


def one_stage_note(ckpt: Checkpoint, where: str = "") -> str:
    return ONE_STAGE_NOTE.format(family=ckpt.config.get("model_type"), pipelined=", ".join(PIPELINED_MODEL_TYPES),
                                 where=where)


def _stage_ranges(n_layers: int, layer_ranges: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    ranges = [tuple(r) for r in layer_ranges] if layer_ranges else [(0, n_layers)]
    ends = [0] + [b for _, b in ranges]
    if [a for a, _ in ranges] != ends[:-1] or ends[-1] != n_layers or any(a > b for a, b in ranges):
        raise CalibrationError(f"layer_ranges {ranges} must be contiguous and cover layers [0, {n_layers})")
    return ranges  # type: ignore[return-value]


def collect_activation_scales(base: str | os.PathLike | Checkpoint, blocks: torch.Tensor,
                              layer_ranges: Sequence[tuple[int, int]] | None = None, micro_batch: int = 4,
                              dtype: torch.dtype | str = torch.float32,
                              device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Mean |input| per channel of every scaled module, running the stages one after another (in-process)."""
    ckpt = open_checkpoint(base)
    ranges = calibration_stages(ckpt, layer_ranges)
    last = len(ranges) - 1
    runners = [StageRunner(ckpt, a, b, is_first=k == 0, is_last=k == last, dtype=dtype, device=device)
               for k, (a, b) in enumerate(ranges)]
    for runner in runners:
        runner.start_recording()
    batches = tqdm(iter_micro_batches(blocks, micro_batch), total=-(-blocks.shape[0] // micro_batch),
                   desc="calibrating", unit="batch", disable=None, leave=False)  # None: no bar without a TTY
    for batch in batches:
        x = batch
        for runner in runners:
            x = runner.forward(x)
    scales: dict[str, torch.Tensor] = {}
    for runner in runners:
        scales.update(runner.stop_recording() or {})
    return scales


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of softmax(logits), computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the block's tokens of -log p(next token), computed in float32."""
    if labels is None:
        raise CalibrationError("the next-token loss (Fisher, trained masks) needs the block's token ids at the "
                               "last stage")
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def collect_sensitivity_scales(base: str | os.PathLike | Checkpoint, blocks: torch.Tensor,
                               dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                               layer_ranges: Sequence[tuple[int, int]] | None = None
                               ) -> dict[str, torch.Tensor]:
    """`G = sum_b |d entropy_loss(block b) / d theta|` for every relaxed parameter (not embeddings/biases),
    in process: the whole model as one stage, or chained `SensitivityStage`s over `layer_ranges`."""
    ckpt = open_checkpoint(base)
    ranges = calibration_stages(ckpt, layer_ranges)
    last = len(ranges) - 1
    stages = [SensitivityStage(StageRunner(ckpt, a, b, k == 0, k == last, dtype, device))
              for k, (a, b) in enumerate(ranges)]
    backprop_blocks(stages, blocks, "sensitivity")
    scales: dict[str, torch.Tensor] = {}
    for stage in stages:
        scales.update(stage.scales())
    return scales


def check_finite(scales: Mapping[str, torch.Tensor], dtype: str | torch.dtype) -> None:
    """A half-precision overflow shows as inf/NaN scales: say so, with the fix, before anything is saved."""
    for name, t in scales.items():
        if not bool(torch.isfinite(t).all()):
            raise CalibrationError(f"calibration in {str(dtype).removeprefix('torch.')} gave non-finite scales "
                                   f"for {name!r} (overflow?); use --dtype bfloat16 or float32")


def calibrate(base: str | os.PathLike | Checkpoint, dataset: str = DEFAULT_DATASET, n_samples: int = 256,
              block_size: int = 512, n_blocks: int | None = None, kind: str = "activation",
              split: str = DEFAULT_SPLIT, micro_batch: int = 4, dtype: torch.dtype | str = "auto",
              device: str | torch.device = "auto",
              layer_ranges: Sequence[tuple[int, int]] | None = None) -> Scales:
    """Compute the scales artifact of `base` (no cache; see `cached_calibrate`)."""
    ckpt = open_checkpoint(base)
    _check_kind(kind)
    device, dtype = resolve_compute(device, dtype)
    tokenizer = load_tokenizer(ckpt.path)
    blocks = load_calibration_blocks(tokenizer, dataset, n_samples, block_size, n_blocks, split)
    if kind == "activation":
        tensors = collect_activation_scales(ckpt, blocks, layer_ranges, micro_batch, dtype, device)
    else:
        tensors = collect_sensitivity_scales(ckpt, blocks, dtype, device, layer_ranges)
    check_finite(tensors, dtype)
    return scales_artifact(ckpt, tensors, kind, dataset, n_samples, block_size, blocks, split, dtype,
                           device_kind(device))


def _check_kind(kind: str) -> None:
    if kind not in ("activation", "sensitivity"):
        raise CalibrationError(f"aim.kind must be 'activation' or 'sensitivity', got {kind!r}")


def scales_artifact(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], kind: str, dataset: str, n_samples: int,
                    block_size: int, blocks: torch.Tensor, split: str, dtype: torch.dtype | str,
                    device: str | None = None) -> Scales:
    """The artifact of scales computed on `blocks` (in process or by the Ray pipeline), with its metadata:
    `dtype` is the compute dtype (the scales themselves are float32), `device` where they were computed."""
    return Scales(tensors=tensors, kind=kind, base_model=ckpt.source, content_hash=ckpt.content_hash(),
                  dataset=str(dataset), n_samples=n_samples, block_size=block_size, n_blocks=blocks.shape[0],
                  dtype=str(parse_dtype(dtype)).removeprefix("torch."), n_tokens=blocks.numel(), device=device,
                  extra={"split": split, "dataset_fingerprint": dataset_fingerprint(str(dataset), split)})


def calibration_settings(ckpt: Checkpoint, dataset: str, n_samples: int, block_size: int,
                         n_blocks: int | None, split: str, dtype: torch.dtype | str) -> dict[str, Any]:
    """Everything besides the weights and the kind that changes the scales: the compute dtype (resolved, not
    `auto`) but not the device (float32 on cpu and cuda share a key) nor micro_batch."""
    return {"dataset": dataset_fingerprint(str(dataset), split), "n_samples": n_samples,
            "block_size": block_size, "n_blocks": n_blocks, "dtype": str(parse_dtype(dtype)),
            "tokenizer": tokenizer_fingerprint(ckpt.path), "shuffle_seed": SHUFFLE_SEED}


def tokenizer_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            h.update(f"{name}:{sha256_file(path / name)}\n".encode())
    return h.hexdigest()


def scales_cache_path(ckpt: Checkpoint, dataset: str, n_samples: int, block_size: int, n_blocks: int | None,
                      split: str, dtype: torch.dtype | str, kind: str,
                      cache_root: str | os.PathLike | None = None) -> Path:
    """Where the scales of this base + calibration settings + kind are cached (one key for every path)."""
    settings = calibration_settings(ckpt, dataset, n_samples, block_size, n_blocks, split, dtype)
    return cache_path(cache_key(ckpt.content_hash(), settings, kind), cache_root)


def cached_calibrate(base: str | os.PathLike | Checkpoint, dataset: str = DEFAULT_DATASET,
                     n_samples: int = 256, block_size: int = 512, n_blocks: int | None = None,
                     kind: str = "activation", split: str = DEFAULT_SPLIT, micro_batch: int = 4,
                     dtype: torch.dtype | str = "auto", device: str | torch.device = "auto",
                     cache_root: str | os.PathLike | None = None,
                     refresh: bool = False) -> Scales:
    """`calibrate`, memoised on disk under `cache_root` (default `$AIM_RAY_CACHE/scales`)."""
    ckpt = open_checkpoint(base)
    device, dtype = resolve_compute(device, dtype)
    path = scales_cache_path(ckpt, dataset, n_samples, block_size, n_blocks, split, dtype, kind, cache_root)
    if path.exists() and not refresh:
        return Scales.load(path)
    scales = calibrate(ckpt, dataset, n_samples, block_size, n_blocks, kind, split, micro_batch, dtype,
                       device)
    scales.save(path)
    return scales
