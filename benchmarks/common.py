"""Benchmark helpers: synthetic Llama-shaped checkpoints, timed subprocesses with peak heap, the I/O floor."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from aim_ray.checkpoint import OutputTensor, plan_shards, shard_filename
from aim_ray.worlds.tiny import build_tokenizer, tiny_config


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv_heads: int, heads: int):
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_synthetic_model(out: Path, config, shapes: dict, seed: int, base: dict | None, n_shards: int,
                          dtype=torch.bfloat16, tokenizer_dir: Path | None = None) -> dict:
    """Random base (seed) or base + 0.01-scale random delta; written as `n_shards` HF safetensors shards."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        t = (0.02 * noise) if base is None else (base[name].float() + 0.002 * noise)
        tensors[name] = t.to(dtype)
    outs = [OutputTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    total = sum(o.nbytes for o in outs)
    shards = plan_shards(outs, total // n_shards + 1)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = shard_filename(i, len(shards))
        save_file({o.name: tensors[o.name] for o in shard}, out / fname, metadata={"format": "pt"})
        weight_map.update({o.name: fname for o in shard})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.torch_dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    return tensors


def build_model_set(root: Path, n_experts: int, *, hidden=1024, intermediate=2816, layers=12, vocab=32000,
                    n_shards=2) -> tuple[Path, list[Path]]:
    """~220M-parameter Llama-shaped bf16 base and experts (cached: rebuilt only if missing)."""
    config = tiny_config("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         intermediate_size=intermediate, num_attention_heads=16, num_key_value_heads=16)
    shapes = llama_shapes(hidden, intermediate, layers, vocab, 16, 16)
    tok = root / "tokenizer"
    if not tok.exists():
        build_tokenizer(tok, vocab_size=256)
    base_dir = root / "base"
    base = None
    if not (base_dir / "config.json").exists():
        base = write_synthetic_model(base_dir, config, shapes, 0, None, n_shards, tokenizer_dir=tok)
    experts = []
    for i in range(n_experts):
        d = root / f"expert_{i}"
        if not (d / "config.json").exists():
            if base is None:
                from aim_ray.checkpoint import Checkpoint

                ck = Checkpoint.open(base_dir)
                base = {n: ck.read(n) for n in ck.names()}
            write_synthetic_model(d, config, shapes, 1000 + i, base, n_shards, tokenizer_dir=tok)
        experts.append(d)
    return base_dir, experts


def merge_yaml(path: Path, method: str, base: Path, experts: list[Path], params: dict) -> Path:
    data = {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": str(e), "parameters": dict(params)} for e in experts]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Run:
    seconds: float
    peak_anon_mb: float
    returncode: int
    tail: str


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        kids = [int(x) for x in out]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def timed(cmd: list[str], env: dict | None = None) -> Run:
    """Wall time and peak anonymous RSS (heap; memory-mapped inputs are page cache) of a command tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            total = sum(_rss_anon_kb(p) for p in [proc.pid, *_children(proc.pid)])
            peak = max(peak, total)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    t.join()
    return Run(seconds, peak / 1024, proc.returncode, out[-2000:])


def io_floor(inputs: list[Path], out_file: Path) -> float:
    """Seconds to read every input weight file once and write one model-sized file (fsynced)."""
    start = time.perf_counter()
    size = 0
    for d in inputs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while block := fh.read(1 << 24):
                    size += len(block)
    first = sorted(inputs[0].glob("*.safetensors"))
    with open(out_file, "wb") as w:
        for f in first:
            w.write(f.read_bytes())
        w.flush()
        os.fsync(w.fileno())
    out_file.unlink()
    return time.perf_counter() - start
