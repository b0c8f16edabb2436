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
1/block_size, which the per-tensor max normalisation removes. Computed on the whole model (one stage holding
every layer), one block per backward pass. With tied embeddings the head gets its own gradient (the embedding
use is excluded), because the tied tensor is relaxed as the head.

Differences from the reference implementation: it accumulates scales in bfloat16 (we use float32, whatever the
compute dtype), it does not check the checkpoint's vocabulary/shape against the config (we refuse mismatches),
and it treats an empty text as a one-token (BOS) sample (we skip texts that are empty after `strip()`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import TOKENIZER_FILES, Checkpoint, parse_dtype, sha256_file
from .errors import CalibrationError, CheckpointError
from .scales import Scales, cache_key, cache_path, is_embedding, open_checkpoint

DEFAULT_DATASET = "mit-han-lab/pile-val-backup"
DEFAULT_SPLIT = "validation"
SHUFFLE_SEED = 42
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
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


# ------------------------------------------------------------------------------------------------ stages


def _hf_config(ckpt: Checkpoint, attn_implementation: str):
    from transformers import AutoConfig

    model_type = ckpt.config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CalibrationError(f"{ckpt.path / 'config.json'}: model_type {model_type!r} cannot be "
                               f"calibrated; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    config = AutoConfig.from_pretrained(str(ckpt.path))
    config._attn_implementation = attn_implementation
    return config


class StageRunner:
    """Decoder layers [layer_start, layer_end) of a causal LM, with only their weights loaded.

    The first stage also owns `model.embed_tokens` and takes token ids; the last owns `model.norm` and
    `lm_head` and returns logits; every other stage maps hidden states to hidden states. Module names are the
    full HF names, so scales from different stages combine into one artifact.
    """

    def __init__(self, checkpoint: str | os.PathLike | Checkpoint, layer_start: int, layer_end: int,
                 is_first: bool | None = None, is_last: bool | None = None,
                 dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa") -> None:
        self.checkpoint = open_checkpoint(checkpoint)
        self.config = _hf_config(self.checkpoint, attn_implementation)
        n_layers = self.config.num_hidden_layers
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first = layer_start == 0 if is_first is None else is_first
        self.is_last = layer_end == n_layers if is_last is None else is_last
        if not (0 <= layer_start <= layer_end <= n_layers) or not (
                layer_start < layer_end or self.is_first or self.is_last):
            raise CalibrationError(f"stage layers [{layer_start}, {layer_end}) are not a valid range of the "
                                   f"{n_layers} decoder layers of {self.checkpoint.path}")
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.modules = self._build()
        self._recorder: ActivationRecorder | None = None

    # -- construction -------------------------------------------------------------------------------------
    def _build(self) -> dict[str, nn.Module]:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # a skeleton that costs no memory; only owned modules get real weights
            skeleton = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
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

    def _materialize(self, prefix: str, module: nn.Module) -> None:
        for pname, meta_param in list(module.named_parameters()):
            full = f"{prefix}.{pname}"
            tensor = self._read(full, tuple(meta_param.shape))
            owner, _, leaf = pname.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            setattr(target, leaf, nn.Parameter(tensor.to(self.device, self.dtype), requires_grad=False))
        for bname, buf in module.named_buffers():
            if buf.is_meta:
                raise CalibrationError(f"{prefix}.{bname}: buffer cannot be loaded from "
                                       f"{self.checkpoint.path}")
        module.eval()

    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        source = name
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            source = "model.embed_tokens.weight"  # as transformers does: the head is the embedding
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
        h = self._embed(x)
        if self.layer_end > self.layer_start:
            position_ids = torch.arange(h.shape[1], device=self.device).unsqueeze(0)
            position_embeddings = self.rotary_emb(h, position_ids)
            masks = self._masks(h, position_ids)
            for i in range(self.layer_start, self.layer_end):
                h = self.modules[f"model.layers.{i}"](
                    h, attention_mask=masks[self._layer_type(i)], position_ids=position_ids,
                    use_cache=False, position_embeddings=position_embeddings)
        if self.is_last:
            h = self.modules["lm_head"](self.modules["model.norm"](h))
        return h

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
                name = f"{prefix}.{sub}" if sub else prefix
                if module._parameters.get("weight") is not None and not is_embedding(name):
                    out[name] = module
        return out

    def start_recording(self) -> None:
        """Hook this stage's modules; every later forward adds its tokens to the scales."""
        self.stop_recording()
        self._recorder = ActivationRecorder(self.scaled_modules())

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


class ActivationRecorder:
    """Forward pre-hooks accumulating sum over tokens of |input| per channel (float32) and the token count."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            # abs is exact in any dtype; the sum accumulates in float32 without a float32 copy of x.
            total = torch.sum(x.detach().abs(), dim=tuple(range(x.dim() - 1)), dtype=torch.float32)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] = self.counts.get(name, 0) + x.numel() // x.shape[-1]

        return record

    @property
    def count(self) -> int:
        return max(self.counts.values(), default=0)

    def means(self) -> dict[str, torch.Tensor]:
        return {name: (s / self.counts[name]).cpu() for name, s in self.sums.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


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
    ranges = _stage_ranges(int(ckpt.config["num_hidden_layers"]), layer_ranges)
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


def collect_sensitivity_scales(base: str | os.PathLike | Checkpoint, blocks: torch.Tensor,
                               dtype: torch.dtype | str = torch.float32,
                               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`G = sum_b |d entropy_loss(block b) / d theta|` for every relaxed parameter (not embeddings/biases)."""
    ckpt = open_checkpoint(base)
    runner = StageRunner(ckpt, 0, int(ckpt.config["num_hidden_layers"]), True, True, dtype, device)
    params = {}
    for prefix, module in runner.modules.items():
        for pname, p in module.named_parameters():
            name = f"{prefix}.{pname}"
            if name.endswith(".weight") and not is_embedding(name):
                p.requires_grad_(True)  # lm_head is its own Parameter even when tied: its gradient alone
                params[name] = p
    grads = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    for block in blocks:
        loss = entropy_loss(runner.run(block.unsqueeze(0)))
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            grads[name] += g.abs().float()
    return {name: g.cpu() for name, g in grads.items()}


def calibrate(base: str | os.PathLike | Checkpoint, dataset: str = DEFAULT_DATASET, n_samples: int = 256,
              block_size: int = 512, n_blocks: int | None = None, kind: str = "activation",
              split: str = DEFAULT_SPLIT, micro_batch: int = 4, dtype: torch.dtype | str = torch.float32,
              device: str | torch.device = "cpu",
              layer_ranges: Sequence[tuple[int, int]] | None = None) -> Scales:
    """Compute the scales artifact of `base` (no cache; see `cached_calibrate`)."""
    ckpt = open_checkpoint(base)
    tokenizer = load_tokenizer(ckpt.path)
    blocks = load_calibration_blocks(tokenizer, dataset, n_samples, block_size, n_blocks, split)
    if kind == "activation":
        tensors = collect_activation_scales(ckpt, blocks, layer_ranges, micro_batch, dtype, device)
    elif kind == "sensitivity":
        tensors = collect_sensitivity_scales(ckpt, blocks, dtype, device)
    else:
        raise CalibrationError(f"aim.kind must be 'activation' or 'sensitivity', got {kind!r}")
    return scales_artifact(ckpt, tensors, kind, dataset, n_samples, block_size, blocks, split, dtype)


def scales_artifact(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], kind: str, dataset: str, n_samples: int,
                    block_size: int, blocks: torch.Tensor, split: str, dtype: torch.dtype | str) -> Scales:
    """The artifact of scales computed on `blocks` (in process or by the Ray pipeline), with its metadata."""
    return Scales(tensors=tensors, kind=kind, base_model=ckpt.source, content_hash=ckpt.content_hash(),
                  dataset=str(dataset), n_samples=n_samples, block_size=block_size, n_blocks=blocks.shape[0],
                  dtype=str(parse_dtype(dtype)).removeprefix("torch."), n_tokens=blocks.numel(),
                  extra={"split": split, "dataset_fingerprint": dataset_fingerprint(str(dataset), split)})


def calibration_settings(ckpt: Checkpoint, dataset: str, n_samples: int, block_size: int,
                         n_blocks: int | None, split: str, dtype: torch.dtype | str) -> dict[str, Any]:
    """Everything besides the weights and the kind that changes the scales (not micro_batch, device)."""
    return {"dataset": dataset_fingerprint(str(dataset), split), "n_samples": n_samples,
            "block_size": block_size, "n_blocks": n_blocks, "dtype": str(parse_dtype(dtype)),
            "tokenizer": _tokenizer_fingerprint(ckpt.path), "shuffle_seed": SHUFFLE_SEED}


def _tokenizer_fingerprint(path: Path) -> str:
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
                     dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                     cache_root: str | os.PathLike | None = None,
                     refresh: bool = False) -> Scales:
    """`calibrate`, memoised on disk under `cache_root` (default `$AIM_RAY_CACHE/scales`)."""
    ckpt = open_checkpoint(base)
    path = scales_cache_path(ckpt, dataset, n_samples, block_size, n_blocks, split, dtype, kind, cache_root)
    if path.exists() and not refresh:
        return Scales.load(path)
    scales = calibrate(ckpt, dataset, n_samples, block_size, n_blocks, kind, split, micro_batch, dtype,
                       device)
    scales.save(path)
    return scales
