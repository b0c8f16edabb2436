"""MergeKit's `tokenizer:` section: the output vocabulary and where each of its embedding rows comes from.

Semantics follow MergeKit (`mergekit/tokenizer/build.py`, `embed.py`):

- `source: base`: the base tokenizer, stripped of tokens whose id is not below the base's `vocab_size`;
  `union`: the base tokenizer plus every other token of every model (ids below that model's `vocab_size`),
  plain tokens first, then added tokens (first model's settings win); `<model>`: that model's tokenizer.
- `tokens:` keys missing from the output vocabulary are appended. Each model's vocabulary tensor is permuted to
  the output vocabulary; a row a model lacks (or every row of a `force`d token) gets a default: the token's
  configured source, else the only model that has it, else the base, else the mean of the models that have it,
  else zeros.
- `pad_to_multiple_of` rounds the rows up; padding rows are each model's mean row.

Everything is resolved in `build_plan` (prepare time); `permute` assembles one model's rows when a vocabulary
tensor is merged, so the engine stays one tensor at a time.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import is_vocab_tensor
from .config import ModelTokenEmbedding, TokenEmbeddingConfig, TokenizerConfig, ZeroEmbedding
from .errors import ConfigError

# A default row: ("zero",), ("mean",) over the models that have the token, or ("row", model, row in its tensor).
RowSource = tuple


@dataclass
class VocabPlan:
    """The output vocabulary and, per input model (index into `refs`), the source row of every output token."""

    refs: list[str]  # unique models, base first
    n_tokens: int
    rows: int  # n_tokens padded to pad_to_multiple_of
    perms: list[torch.Tensor]  # per model: int64 [n_tokens], its row for each output token or -1
    defaults: dict[int, RowSource]  # output token id -> default row source (used where a model lacks it / forced)
    forced: list[int]
    tokenizer: Any = field(repr=False, default=None)  # the output tokenizer (transformers), saved by finalize

    def identity(self, model: int, stored_rows: int) -> bool:
        """Whether model's stored tensor already is its output tensor (no permutation, defaults or padding)."""
        p = self.perms[model]
        return (stored_rows == self.rows == self.n_tokens and not self.forced
                and torch.equal(p, torch.arange(self.n_tokens)))

    def permute(self, model: int, read_stored: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Model's vocabulary tensor in the output vocabulary, float32. `read_stored(m)`: model m's stored tensor
        (each model read once here, however many default rows come from it)."""
        cache: dict[int, torch.Tensor] = {}

        def read(m: int) -> torch.Tensor:
            if m not in cache:
                cache[m] = read_stored(m)
            return cache[m]

        src = read(model)
        out = torch.zeros((self.rows, *src.shape[1:]), dtype=torch.float32)
        p = self.perms[model].clone()
        if self.forced:
            p[self.forced] = -1
        own = p >= 0
        out[:self.n_tokens][own] = src[p[own]].to(torch.float32)
        need = [t for t in (~own).nonzero().flatten().tolist() if t in self.defaults]
        for t in need:
            out[t] = self._default_row(t, read)
        if self.rows > self.n_tokens:  # padding: the mean embedding (MergeKit's choice, after Hewitt 2021)
            out[self.n_tokens:] = out[:self.n_tokens].mean(dim=0)
        return out

    def _default_row(self, token: int, read: Callable[[int], torch.Tensor]) -> torch.Tensor:
        kind = self.defaults[token]
        if kind[0] == "row":
            return read(kind[1])[kind[2]].to(torch.float32)
        if kind[0] == "mean":
            have = [m for m in range(len(self.refs)) if self.perms[m][token] >= 0]
            total = read(have[0])[int(self.perms[have[0]][token])].to(torch.float32).clone()
            for m in have[1:]:
                total += read(m)[int(self.perms[m][token])].to(torch.float32)
            return total / len(have)
        return torch.zeros(read(0).shape[1:], dtype=torch.float32)


# ------------------------------------------------------------------------------------------ tokenizers


def load_tokenizer(path: Path | str, option: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ConfigError(f"{option}: cannot load the tokenizer of {path} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def strip_tokenizer(tok, vocab_size: int, option: str):
    """MergeKit's `get_stripped_tokenizer`: drop tokens whose id is >= the model's vocabulary rows (BPE only)."""
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    backend = getattr(tok, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else None
    if data is None or data["model"]["type"] != "BPE":
        raise ConfigError(f"{option}: its tokenizer has {len(unused)} token(s) beyond its {vocab_size} vocabulary "
                          f"rows and is not a fast BPE tokenizer; they cannot be stripped")
    from tokenizers import Tokenizer

    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = [m for m, pair in zip(data["model"]["merges"], pairs) if not set(pair) & unused]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _copy_tokenizer(tok):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return AutoTokenizer.from_pretrained(d, use_fast=True)


def union_tokenizer(base_tok, toks: Sequence[tuple[Any, int]]):
    """The base tokenizer extended with every other model's tokens (ids below its rows), in model order."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, rows in toks:
        special = tok.added_tokens_decoder
        specials = {info.content for info in special.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows and t not in specials:
                plain.setdefault(t, None)
        for i, info in special.items():
            if i < rows:
                added.setdefault(info.content, info)
    out = _copy_tokenizer(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


# ------------------------------------------------------------------------------------------------- plan


def _expert_tokenizer(path: Path, ref: str, base_tok):
    """MergeKit: a model whose tokenizer does not load is assumed to share the base's."""
    try:
        return load_tokenizer(path, ref)
    except ConfigError:
        return base_tok


def vocab_size_of(ckpt) -> int:
    size = ckpt.config.get("vocab_size")
    if isinstance(size, int):
        return size
    for name in ckpt.names():
        if is_vocab_tensor(name):
            return ckpt.tensors[name].shape[0]
    raise ConfigError(f"tokenizer: {ckpt.path} has neither config vocab_size nor an embedding tensor")


def build_plan(section: TokenizerConfig, refs: Sequence[str], ckpts: Sequence[Any], base_is_set: bool) -> VocabPlan:
    """refs/ckpts: the unique input models, base (or MergeKit's stand-in) first."""
    sizes = [vocab_size_of(c) for c in ckpts]
    base_tok = strip_tokenizer(load_tokenizer(ckpts[0].path, "base_model"), sizes[0], "base_model")
    toks = [base_tok] + [_expert_tokenizer(c.path, r, base_tok) for r, c in zip(refs[1:], ckpts[1:])]
    source = section.source
    if source == "base":
        out = _copy_tokenizer(base_tok)
    elif source == "union":
        out = union_tokenizer(base_tok, list(zip(toks, sizes)))
    elif source in refs:  # stripped to its rows too: MergeKit fails (KeyError) on tokens beyond them
        m = refs.index(source)
        out = strip_tokenizer(load_tokenizer(ckpts[m].path, "tokenizer.source"), sizes[m], "tokenizer.source")
    else:
        raise ConfigError(f"tokenizer.source {source!r}: must be 'base', 'union' or one of the merged models")
    tokens = dict(section.tokens or {})
    have = set(out.get_vocab())
    for t in tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    n_tokens = len(vocab)
    perms = []
    for tok, rows in zip(toks, sizes):
        own = tok.get_vocab()
        p = torch.full((n_tokens,), -1, dtype=torch.int64)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < rows:
                p[i] = j
        perms.append(p)
    pad = section.pad_to_multiple_of
    rows = -(-n_tokens // pad) * pad if pad else n_tokens
    defaults = _defaults(vocab, tokens, refs, perms, toks, sizes, base_is_set)
    forced = sorted(vocab[t] for t, cfg in tokens.items() if cfg.force)
    return VocabPlan(list(refs), n_tokens, rows, perms, defaults, forced, out)


def _defaults(vocab: dict[str, int], tokens: dict[str, TokenEmbeddingConfig], refs: Sequence[str],
              perms: list[torch.Tensor], toks: list[Any], sizes: list[int], base_is_set: bool
              ) -> dict[int, RowSource]:
    """MergeKit's `assign_embedding_sources` + `compute_default_embedding`, for the rows that need one."""
    defaults: dict[int, RowSource] = {}
    present = torch.stack(perms) >= 0  # [models, tokens]
    count = present.sum(dim=0)
    for t, i in vocab.items():
        cfg = tokens.get(t)
        if not (cfg is not None and cfg.force) and bool(count[i] == len(refs)):
            continue
        if cfg is not None:
            defaults[i] = _configured(t, i, cfg, refs, perms, toks, sizes)
        elif count[i] == 1:
            m = int(present[:, i].nonzero()[0])
            defaults[i] = ("row", m, int(perms[m][i]))
        elif count[i] == 0:
            defaults[i] = ("zero",)
        elif base_is_set and bool(present[0, i]):
            defaults[i] = ("row", 0, int(perms[0][i]))
        else:
            defaults[i] = ("mean",)
    return defaults


def _configured(token: str, i: int, cfg: TokenEmbeddingConfig, refs: Sequence[str], perms: list[torch.Tensor],
                toks: list[Any], sizes: list[int]) -> RowSource:
    where = f"tokenizer.tokens[{token!r}].source"
    src = cfg.source
    if isinstance(src, ZeroEmbedding):
        return ("zero",)
    if src is None:
        raise ConfigError(f"{where}: needed (the token is forced or missing from a model) but not given")
    model = src.model if isinstance(src, ModelTokenEmbedding) else src
    if model not in refs:
        raise ConfigError(f"{where}: model {model!r} is not one of the merged models")
    m = refs.index(model)
    if isinstance(src, ModelTokenEmbedding):
        row = src.token_id
        if row is None:
            row = toks[m].get_vocab().get(src.token)
            if row is None:
                raise ConfigError(f"{where}.token: {src.token!r} is not in the tokenizer of {model}")
        if not 0 <= row < sizes[m]:
            raise ConfigError(f"{where}: token id {row} is outside {model}'s {sizes[m]} vocabulary rows")
        return ("row", m, row)
    if perms[m][i] < 0:
        raise ConfigError(f"{where}: {token!r} is not in the tokenizer of {model}")
    return ("row", m, int(perms[m][i]))
