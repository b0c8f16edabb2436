"""Shared fixtures: tiny real checkpoints and the tiny world (built once per session) and a config writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from aim_ray.worlds import toy
from aim_ray.worlds.tiny import build_tiny_family
from aim_ray.worlds.toy import build_toy_world

torch.set_num_threads(1)  # 2-core CI machine; keep test timings predictable
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/aim-ray from tests."""
    if "AIM_RAY_CACHE" not in os.environ:
        os.environ["AIM_RAY_CACHE"] = str(tmp_path_factory.mktemp("aim-ray-cache"))
    yield


@pytest.fixture(scope="session")
def toy_world(_isolated_cache, tmp_path_factory) -> toy.ToyWorld:
    """The tiny world (base + 3 experts with real skills, lm-eval tasks): built once per session under the
    session's cache (about 80 s on one core), or reused from `$AIM_RAY_CACHE` when that is set."""
    cache = None if os.environ.get(toy.CACHE_ENV) else tmp_path_factory.getbasetemp() / "cache" / toy.WORLD_NAME
    return build_toy_world(cache)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """float32 Llama, 2 layers, base + 3 experts with distinct random deltas."""
    return build_tiny_family(tmp_path_factory.mktemp("llama"), "llama", n_experts=3, seed=1)


@pytest.fixture(scope="session")
def llama_bf16_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_tiny_family(tmp_path_factory.mktemp("llama_bf16"), "llama", n_experts=3, seed=2,
                             dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Qwen2 (has q/k/v biases), tied embeddings."""
    return build_tiny_family(tmp_path_factory.mktemp("qwen2"), "qwen2", n_experts=2, seed=3,
                             tie_word_embeddings=True)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def make_config(tmp_path):
    def make(method: str, base: Path | None, experts: list[Path], expert_params: list[dict] | None = None,
             name: str = "merge.yaml", **top) -> Path:
        expert_params = expert_params or [{"weight": 1.0} for _ in experts]
        data = {"merge_method": method, "models": [
            {"model": str(e), "parameters": p} for e, p in zip(experts, expert_params)]}
        if base is not None:
            data["base_model"] = str(base)
        data.update(top)
        return write_yaml(tmp_path / name, data)

    return make
