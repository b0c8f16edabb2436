"""Resume and output safety: content-checked --resume, killed drivers, one run per output, kept shards after a user
error, --overwrite only over checkpoints, unique shard temporaries and a verified commit.

Every resumed output is compared byte for byte with an uninterrupted run of the same merge.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from checks import assert_same_checkpoint
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from aim_ray import engine
from aim_ray.checkpoint import OutputDir, OutputLock, sha256_file, shard_filename
from aim_ray.cli import main
from aim_ray.config import load_merge_config
from aim_ray.engine import prepare, run_merge, write_shard
from aim_ray.errors import CheckpointError, ConfigError, OutputBusyError
from aim_ray.resume import PROGRESS, Progress
from aim_ray.worlds.tiny import build_tiny_family

ROOT = Path(__file__).resolve().parent.parent
SHARD = 20_000  # bytes: ~20 shards for the tiny 2-layer Llama


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("safety"), "llama", n_experts=2, seed=11, num_layers=2)


def write_config(path: Path, base: Path, experts: list[Path]) -> Path:
    data = {"merge_method": "dare_ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 0.7, "density": 0.5}} for e in experts]}
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def merge_cli(cfg: Path, out: Path, *extra: str):
    return run_cli("merge", cfg, "--out", out, "--quiet", "--shard-size", SHARD, *extra)


@pytest.fixture(scope="module")
def config(family, tmp_path_factory) -> Path:
    base, experts = family
    return write_config(tmp_path_factory.mktemp("cfg") / "merge.yaml", base, experts)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert merge_cli(config, out).exit_code == 0
    return out


def job_of(cfg: Path, **kw):
    return prepare(load_merge_config(cfg), shard_size=SHARD, **kw)


def work_of(out: Path) -> Path:
    return out.parent / f".{out.name}.aim-ray-partial"




class DriverCrash(Exception):
    """Not a user error: the work dir is kept as it is, like after a crash or Ctrl-C."""


def crash_after(monkeypatch, shards: int) -> None:
    """The in-process driver dies once `shards` shards are written and recorded."""
    calls = []

    def write(*args, **kwargs):
        if len(calls) == shards:
            raise DriverCrash
        calls.append(args[2])
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(engine, "write_shard", write)


def recorded(out: Path) -> list[int]:
    return sorted(int(i) for i in json.loads((work_of(out) / PROGRESS).read_text())["shards"])


def names(indices, n: int) -> list[str]:
    return [shard_filename(i, n) for i in indices]


# ------------------------------------------------------------------------------------------ changed inputs


def test_changed_input_refuses_resume_unchanged_resumes_byte_identical(family, reference, tmp_path, monkeypatch):
    base, experts = family
    mutable = tmp_path / "expert1"
    shutil.copytree(experts[1], mutable)
    cfg = write_config(tmp_path / "merge.yaml", base, [experts[0], mutable])
    out = tmp_path / "out"
    crash_after(monkeypatch, 3)
    with pytest.raises(DriverCrash):
        run_merge(job_of(cfg), out, progress=False)
    monkeypatch.undo()
    assert recorded(out) == [0, 1, 2]

    weights = mutable / "model.safetensors"
    original, stat = weights.read_bytes(), weights.stat()
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0  # same shapes, other values
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = rf"^expert 1 \({re.escape(str(mutable))}\): (content changed|weight files modified) since the"
    with pytest.raises(CheckpointError, match=changed + r" interrupted run.*; rerun without --resume$"):
        run_merge(job_of(cfg), out, resume=True, progress=False)
    assert recorded(out) == [0, 1, 2] and not out.exists()  # the refusal touched nothing

    weights.write_bytes(original)  # the same input again (bytes and mtime)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resumed = run_merge(job_of(cfg), out, resume=True, progress=False)
    assert_same_checkpoint(reference, resumed)
    n = len(job_of(cfg).shards)
    assert json.loads((resumed / "merge_report.json").read_text())["resumed_shards"] == names([0, 1, 2], n)


def test_resume_checks_content_once_hashed_and_timestamps_before(family, tmp_path):
    """A touched but identical input resumes once its hash is recorded; before, its (size, mtime) must match."""
    base, experts = family
    shutil.copytree(experts[0], tmp_path / "expert0")
    config = write_config(tmp_path / "merge.yaml", base, [tmp_path / "expert0", experts[1]])
    job = job_of(config)
    work = tmp_path / "work"
    work.mkdir()
    shard = work / shard_filename(0, len(job.shards))
    shard.write_bytes(b"finished shard")
    progress = Progress(job, work)
    progress.load(resume=False)
    progress.wait_hashed()
    progress.record(0, sha256_file(shard))
    weights = job.experts[0].files[0]
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched
    assert Progress(job_of(config), work).load(resume=True) == {0: sha256_file(shard)}

    state = json.loads((work / PROGRESS).read_text())
    for record in state["inputs"]:
        record["hash"] = None  # interrupted before the hashes were known
    (work / PROGRESS).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"^expert 0 \(.*\): weight files modified since the interrupted"):
        Progress(job_of(config), work).load(resume=True)


def test_other_settings_refuse_resume(config, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after(monkeypatch, 2)
    with pytest.raises(DriverCrash):
        run_merge(job_of(config), out, progress=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"the --seed differs from the interrupted run's \(0 -> 1\); rerun "
                                          r"without --resume"):
        run_merge(job_of(config, seed=1), out, resume=True, progress=False)
    assert recorded(out) == [0, 1]


# ----------------------------------------------------------------------------------------- killed drivers

SLOW_CLI = """
import sys, time
from aim_ray import cli, engine
merge = engine.merge_tensor
def slow_merge_tensor(*args, **kwargs):  # slow while a shard's temporary file is open
    time.sleep(float(sys.argv[1]))
    return merge(*args, **kwargs)
engine.merge_tensor = slow_merge_tensor
cli.main(args=sys.argv[2:], prog_name="aim-ray")
"""

# A driver of `distributed_merge` on the cluster at argv[3], each tensor slowed by `SlowRelax`.
SLOW_RAY = """
import sys, time
from aim_ray.config import load_merge_config
from aim_ray.driver import ClusterOptions, distributed_merge
from aim_ray.engine import prepare
class SlowRelax:  # defined in __main__: Ray pickles it by value
    def __init__(self, seconds): self.seconds = seconds
    def __call__(self, name, theta_pre, delta): time.sleep(self.seconds); return theta_pre + delta
    def fingerprint(self): return "theta_pre + delta"
cfg, out, address, shard, delay = sys.argv[1:6]
job = prepare(load_merge_config(cfg), shard_size=int(shard))
cluster = ClusterOptions(workers=2, address=address, cpus_per_worker=0.25, gpus_per_worker=0, ready_timeout_s=60)
distributed_merge(job, out, cluster, aim=lambda pool: (SlowRelax(float(delay)), {}, {}), progress=False)
"""


def _spawn(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def start_slow_merge(cfg: Path, out: Path, delay: float) -> subprocess.Popen:
    """`aim-ray merge --workers 1` in another process, each tensor `delay` s slower."""
    return _spawn(SLOW_CLI, str(delay), "merge", str(cfg), "--out", str(out), "--quiet", "--shard-size",
                  str(SHARD), "--threads", "1")


def wait_for_shards(proc: subprocess.Popen, out: Path, count: int = 1, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"merge exited early ({proc.returncode}): {proc.stdout.read()}")
        try:
            if len(json.loads((work_of(out) / PROGRESS).read_text())["shards"]) >= count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no shard recorded within {timeout} s")


def kill_mid_merge(proc, config, out) -> tuple[list[int], int]:
    """SIGKILL a merge once it has recorded a shard; returns (recorded shards, shard count)."""
    wait_for_shards(proc, out)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = recorded(out)
    n = len(job_of(config).shards)
    assert done and len(done) < n and not out.exists()
    return done, n


def test_killed_driver_resumes_byte_identical(config, reference, tmp_path):
    out = tmp_path / "out"
    done, n = kill_mid_merge(start_slow_merge(config, out, delay=0.15), config, out)

    result = merge_cli(config, out, "--resume")  # the dead run's lock is gone with it
    assert result.exit_code == 0, result.output
    assert_same_checkpoint(reference, out)  # no stale .tmp of the killed writer either
    assert json.loads((out / "merge_report.json").read_text())["resumed_shards"] == names(done, n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file, no work dir


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need SlowRelax, not this file
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def test_killed_ray_driver_resumes_byte_identical(local_ray, config, reference, tmp_path):
    """The driver of a 2-worker merge is SIGKILLed after its first recorded shard (its actors die with its job);
    --resume with a new pool on the same cluster finishes with the uninterrupted bytes."""
    from aim_ray.driver import ClusterOptions, WorkerPool, distributed_merge

    out = tmp_path / "out"
    done, n = kill_mid_merge(_spawn(SLOW_RAY, str(config), str(out), local_ray, str(SHARD), "0.1"), config, out)

    with WorkerPool(ClusterOptions(workers=2, cpus_per_worker=0.25, gpus_per_worker=0, ready_timeout_s=60)) as pool:
        resumed = distributed_merge(job_of(config), out, pool.options, pool=pool, resume=True, progress=False,
                                    aim=lambda pool: (SlowRelax(0.0), {}, {}))
    assert_same_checkpoint(reference, resumed)
    report = json.loads((resumed / "merge_report.json").read_text())
    assert report["resumed_shards"] == names(done, n)
    assert set(report["service"]["writer_pids"]) == {str(i) for i in range(n) if i not in done}


def test_second_run_to_the_same_out_is_refused_while_the_first_runs(config, reference, tmp_path):
    out = tmp_path / "out"
    proc = start_slow_merge(config, out, delay=0.08)
    try:
        wait_for_shards(proc, out)
        for extra in ((), ("--resume",)):
            result = merge_cli(config, out, *extra)
            assert result.exit_code == 2
            assert (f"another aim-ray run (pid {proc.pid} on {socket.gethostname()}, started "
                    in result.output), result.output
            assert "is writing this output; wait for it to finish or stop it" in result.output
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_same_checkpoint(reference, out)  # the refused runs changed nothing of the first one's work


# ------------------------------------------------------------------------------------------ user errors


def test_user_error_mid_resume_keeps_the_finished_shards(family, tmp_path, monkeypatch):
    base, experts = family
    job = job_of(write_config(tmp_path / "probe.yaml", base, experts))
    last = job.shards[-1][0].name  # merged last: every other shard is finished before it
    bad = tmp_path / "bad_expert"
    shutil.copytree(experts[0], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[last].view(-1)[0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path / "merge.yaml", base, [bad, experts[1]])
    n = len(job.shards)

    out = tmp_path / "out"
    crash_after(monkeypatch, 2)
    with pytest.raises(DriverCrash):
        run_merge(job_of(cfg), out, progress=False)
    monkeypatch.undo()
    result = merge_cli(cfg, out, "--resume")  # finds the NaN in the last shard
    assert result.exit_code == 2
    assert "NaN or Inf" in result.output and f"({n - 1} finished shard(s) kept in {work_of(out)}" in result.output
    assert "rerun with --resume to continue from them" in result.output
    assert recorded(out) == list(range(n - 1)) and not out.exists()

    result = merge_cli(cfg, out, "--resume", "--allow-nonfinite")  # continues: only the last shard is written
    assert result.exit_code == 0, result.output
    assert json.loads((out / "merge_report.json").read_text())["resumed_shards"] == names(range(n - 1), n)
    fresh = tmp_path / "fresh"
    assert merge_cli(cfg, fresh, "--allow-nonfinite").exit_code == 0
    assert_same_checkpoint(fresh, out)


# -------------------------------------------------------------------------------------------- overwrite


@pytest.mark.parametrize("kind", ["user_files", "config_only", "hf_checkpoint", "empty"])
def test_overwrite_replaces_only_checkpoints_or_empty_dirs(kind, family, config, reference, tmp_path):
    out = tmp_path / "out"
    if kind == "hf_checkpoint":
        shutil.copytree(family[1][0], out)
        (out / "README.md").write_text("model card")
    else:
        out.mkdir()
    if kind == "user_files":
        (out / "notes.txt").write_text("mine")
        (out / "data").mkdir()
    if kind == "config_only":
        (out / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = merge_cli(config, out, "--overwrite")
    if kind in ("user_files", "config_only"):
        assert result.exit_code == 2
        line = result.output.strip()
        assert line.count("\n") == 0 and f"{out}: --overwrite replaces only a model checkpoint" in line
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # refused before any work
    else:
        assert result.exit_code == 0, result.output
        assert_same_checkpoint(reference, out)


# --------------------------------------------------------------------------------- temporaries and commit


class SlowRelax:
    """theta_pre + delta, slowly (bit-identical to no relaxation; one identity whatever the speed)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, name, theta_pre, delta):
        time.sleep(self.seconds)
        return theta_pre + delta

    def fingerprint(self) -> str:
        return "theta_pre + delta"


def test_two_writers_of_one_shard_never_share_a_temporary(config, tmp_path):
    """A writer on a partitioned node and its replacement write the same shard at once: both finish, the shard is
    whole, nothing is left over."""
    job = job_of(config)
    index = max(range(len(job.shards)), key=lambda i: len(job.shards[i]))
    digests: list[str] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            digests.append(write_shard(job_of(config), tmp_path, index, SlowRelax(0.05)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(digests) == 2 and digests[0] == digests[1]
    final = tmp_path / shard_filename(index, len(job.shards))
    assert sha256_file(final) == digests[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_commit_refuses_a_shard_whose_bytes_differ(config, reference, tmp_path, monkeypatch):
    job = job_of(config)
    victim = shard_filename(1, len(job.shards))
    finalize = engine.finalize

    def finalize_then_replace(job, work, digests, report):  # a stray writer replaces a recorded shard
        finalize(job, work, digests, report)
        data = bytearray((work / victim).read_bytes())
        data[-1] ^= 0xFF
        (work / victim).write_bytes(bytes(data))
        (work / f"{victim}.0123abcd.tmp").write_bytes(b"stale")

    monkeypatch.setattr(engine, "finalize", finalize_then_replace)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{victim}: sha256 [0-9a-f]{{16}}\.\.\. differs from the digest "
                                              r"recorded when it was written"):
        run_merge(job, out, progress=False)
    monkeypatch.undo()
    assert not out.exists() and (work_of(out) / victim).exists()

    resumed = run_merge(job_of(config), out, resume=True, progress=False)  # rewrites only the damaged shard
    assert_same_checkpoint(reference, resumed)
    report = json.loads((resumed / "merge_report.json").read_text())
    assert report["resumed_shards"] == [s for s in names(range(len(job.shards)), len(job.shards)) if s != victim]


# ----------------------------------------------------------------------------------------------- the lock


def test_lock_names_its_holder_and_is_released(tmp_path):
    out = tmp_path / "out"
    first = OutputDir(out)
    with first.locked():
        with pytest.raises(OutputBusyError, match=rf"another aim-ray run \(pid {os.getpid()} on "):
            with OutputDir(out).locked():
                pass
        with first.locked():  # re-entrant for its owner
            pass
        assert first.lock_file.exists()
    assert not first.lock_file.exists()
    with OutputDir(out).locked():
        pass


def test_lock_without_os_locks_takes_over_a_dead_holder_only(tmp_path, monkeypatch):
    """Filesystems without locks (flock gives ENOLCK, e.g. NFS mounted nolock): an exclusively created file."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    path = tmp_path / ".out.aim-ray-lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": "earlier"}))
    lock = OutputLock.acquire(path, out)  # its holder is dead: stale, taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()} .*; if that run is gone, delete {path}"):
        OutputLock.acquire(path, out)
    lock.release()
    assert not path.exists()
