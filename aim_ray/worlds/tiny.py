"""Tiny real Hugging Face checkpoints for tests, benchmarks and the demo (no hub access needed).

`build_tiny_family` writes a random base model and experts = base + distinct random deltas, each a normal
`save_pretrained` directory (safetensors, config, tokenizer). The trained "tiny world" with real skills
lives in `aim_ray.toy`; this module only makes shapes and bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "merge experts with activation informed merging",
    "0 1 2 3 4 5 6 7 8 9 + - = ? ;",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "key value recall reverse string add numbers answer question",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 256):
    """Train a small byte-level BPE tokenizer locally and save it as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(
    family: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    **overrides,
):
    """A transformers config of the given family, small enough to build and run in milliseconds."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 + 16,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return classes[family](**kwargs)


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init leaves norms at exactly 1; perturb them so norm-weight merges are not trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def save_model(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               max_shard_size: str | None = None) -> Path:
    """`save_pretrained` (sharded with an index when `max_shard_size`, e.g. "200KB", is given)."""
    out = Path(out_dir)
    sharding = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), safe_serialization=True, **sharding)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def add_expert_delta(model, seed: int, scale: float = 0.02):
    """Add a distinct random task vector to every parameter (an 'expert' without training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_((scale * noise).to(p.dtype))
    return model


def build_tiny_family(
    root: str | Path,
    family: str = "llama",
    n_experts: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    delta_scale: float = 0.02,
    max_shard_size: str | None = None,
    **config_overrides,
) -> tuple[Path, list[Path]]:
    """Write `root/base` and `root/expert_{i}`; return their paths. Deterministic in `seed`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir, vocab_size=config_overrides.get("vocab_size", 256))
    config = tiny_config(family, **config_overrides)
    base = build_model(config, seed=seed, dtype=dtype)
    base_dir = save_model(base, root / "base", tok_dir, max_shard_size)
    experts = []
    for i in range(n_experts):
        expert = add_expert_delta(build_model(config, seed=seed, dtype=dtype), seed=seed * 1000 + i + 1,
                                  scale=delta_scale)
        experts.append(save_model(expert, root / f"expert_{i}", tok_dir, max_shard_size))
    return base_dir, experts


_DATA_WORDS = "alpha beta gamma delta the quick brown fox jumps over lazy dog key value recall answer".split()


def write_expert_data(root: str | Path, n_experts: int, lines: int = 120) -> list[Path]:
    """One small `.jsonl` text file per expert (`root/data{i}.jsonl`, 12 words a line, each expert drawing from
    its own part of a small vocabulary): per-model data for the data-aware merges' tests."""
    import json
    import random

    paths = []
    for i in range(n_experts):
        rnd = random.Random(i)
        path = Path(root) / f"data{i}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rnd.choice(_DATA_WORDS[i * 4:]) for _ in range(12))})
                                + "\n" for _ in range(lines)))
        paths.append(path)
    return paths
