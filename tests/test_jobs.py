"""`ray job submit` and `aim-ray merge --address` against a real head node started here; `--dry-run`.

The head runs `ray start --head --block` in its own session with its own `--temp-dir`: other Ray users on the
machine never see it (a plain `ray.init()` elsewhere does not attach to it), and teardown ends exactly its
process group. (`ray stop` would kill every Ray process of the user, including other sessions' clusters.)
Ray 2.60 enables token authentication: the head and the job CLI get `RAY_AUTH_MODE=token` and one token for
this module through `RAY_AUTH_TOKEN` (a fresh machine has no ~/.ray/auth_token).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from aim_ray.cli import main as cli
from aim_ray.config import load_merge_config
from aim_ray.engine import prepare, run_merge

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHARD = "20kB"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUTH_TOKEN = uuid.uuid4().hex + uuid.uuid4().hex


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = AUTH_TOKEN
    return {**env, **extra}


@pytest.fixture(scope="module")
def head(tmp_path_factory, llama_family):
    """A one-node cluster (2 CPU slots); yields (GCS address, dashboard URL)."""
    port, dash = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's unix socket paths live under it
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--num-gpus=0", "--disable-usage-stats", "--include-dashboard=true", f"--temp-dir={temp}",
         f"--ray-client-server-port={_free_port()}", "--block"],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_ready(url, proc)
        yield f"127.0.0.1:{port}", url
    finally:
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        r = subprocess.run([str(BIN / "ray"), "job", "list"], env=_env(RAY_ADDRESS=url), capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"Ray head at {url} not ready after {timeout} s")


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (GCS, raylet, dashboard, workers), SIGKILL what lingers."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1)  # children of the group may outlive `ray start` briefly


@pytest.fixture(scope="module")
def merge_config(llama_family, tmp_path_factory) -> Path:
    base, experts = llama_family
    data = {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.6}} for e in experts]}
    path = tmp_path_factory.mktemp("jobcfg") / "ties.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(merge_config, tmp_path_factory) -> Path:
    job = prepare(load_merge_config(merge_config), shard_size=20_000)
    return run_merge(job, tmp_path_factory.mktemp("jobref") / "out", progress=False)


def assert_same_weights(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "merge_report.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "merge_report.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ray_job_submit_merge(head, merge_config, reference, tmp_path):
    _, url = head
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "-m", "aim_ray.jobs.merge",
           str(merge_config), "--out", str(out), "--workers", "2", "--shard-size", SHARD, "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(RAY_ADDRESS=url), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr and '"aim_ray_job"' in r.stdout
    assert_same_weights(reference, out)


def test_cli_attaches_with_address(head, merge_config, reference, tmp_path):
    """`aim-ray merge --workers 2 --address` attaches (plain ray.init(address=...)), starts no cluster."""
    address, _ = head
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "aim_ray.cli", "merge", str(merge_config), "--out", str(out),
           "--workers", "2", "--address", address, "--shard-size", SHARD, "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in r.stderr
    assert_same_weights(reference, out)


def test_dry_run_prints_plan_and_writes_nothing(merge_config, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["merge", str(merge_config), "--out", str(out), "--workers", "3", "--dry-run",
                                 "--shard-size", SHARD, "--gpus-per-worker", "1", "--placement", "spread"])
    assert r.exit_code == 0, r.output
    assert "3 worker(s), placement spread" in r.output and "'GPU': 1.0" in r.output
    assert r.output.count("\n| ") == 4  # header + 3 workers
    assert "embed" in r.output and "head" in r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_package_job_module_dry_run(merge_config, tmp_path):
    """`python -m aim_ray.jobs.merge` outside a job: the plan only."""
    r = subprocess.run([sys.executable, "-m", "aim_ray.jobs.merge", str(merge_config), "--out",
                        str(tmp_path / "o"), "--workers", "2", "--dry-run"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"dry_run": true' in r.stdout and "2 worker(s)" in r.stdout


def test_one_worker_never_imports_ray(merge_config, tmp_path):
    """`--workers 1` is the pure single-process path."""
    args = ["merge", str(merge_config), "--out", str(tmp_path / "o"), "--quiet"]
    code = ("import sys; from click.testing import CliRunner; from aim_ray.cli import main; "
            f"r = CliRunner().invoke(main, {args!r}); assert r.exit_code == 0, r.output; "
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("False")
    assert (tmp_path / "o" / "config.json").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_example_configs_validate(name):
    """The shipped job configs parse and their method parameters resolve (no download)."""
    from aim_ray.methods import get_method, resolve_params

    cfg = load_merge_config(ROOT / "configs" / name)
    resolve_params(get_method(cfg.merge_method), [m.parameters for m in cfg.models], cfg.parameters)
    assert cfg.aim is not None and cfg.aim.omega == 0.4
