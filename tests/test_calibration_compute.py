"""Calibration on the hardware there is: --device / --dtype resolution and errors, half-precision compute with
float32 accumulation, and (marked gpu) bfloat16 on cuda against float32 on the CPU."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from aim_ray.aim import normalize
from aim_ray.calibration import (
    ActivationRecorder,
    SensitivityStage,
    StageRunner,
    cached_calibrate,
    check_finite,
    collect_activation_scales,
    collect_sensitivity_scales,
    resolve_compute,
)
from aim_ray.cli import main
from aim_ray.config import AimConfig, CalibrationConfig, load_merge_config
from aim_ray.errors import CalibrationError, ConfigError
from aim_ray.worlds.tiny import build_tiny_family

# bfloat16 keeps 8 mantissa bits (unit roundoff 2^-8 = 0.0039). Measured on these tiny 4-layer models (3 families,
# 3 seeds): activation scales within 1.3% of float32 per element, A = s / max(s) within 0.009; sensitivity A
# within 0.029 (a gradient goes through every layer twice). The bounds leave ~1.5x headroom.
BF16_ACT_RTOL = 0.02
BF16_ACT_DA = 0.015
BF16_SENS_DA = 0.045


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_RAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_family(tmp_path_factory.mktemp("compute"), "llama", n_experts=0, num_layers=4)[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("compute_data") / "calib.jsonl"
    words = "the quick brown fox jumps over the lazy dog key value".split()
    path.write_text("".join(json.dumps({"text": " ".join(words[i % 7: i % 7 + 3 + i % 5])}) + "\n"
                            for i in range(40)))
    return path


def _blocks(n: int = 4, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _max_da(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(ref)
    return max(float((normalize(got[k]) - normalize(ref[k])).abs().max()) for k in ref)


# ------------------------------------------------------------------------------------------ resolution


def test_auto_is_cuda_bf16_with_a_gpu_else_cpu_fp32():
    assert resolve_compute("auto", "auto", cuda=False) == ("cpu", "float32")
    assert resolve_compute("auto", "auto", cuda=True) == ("cuda", "bfloat16")
    assert resolve_compute("cpu", "auto", cuda=True) == ("cpu", "float32")
    assert resolve_compute("auto", "fp32", cuda=True) == ("cuda", "float32")
    assert resolve_compute("CPU", "torch.bfloat16", cuda=False) == ("cpu", "bfloat16")


def test_option_errors_name_the_option():
    with pytest.raises(CalibrationError, match=r"^calibration\.device \(--device\) must be auto, cpu, cuda or "
                                               r"cuda:N, got 'tpu'$"):
        resolve_compute("tpu", "auto")
    with pytest.raises(CalibrationError, match=r"^calibration\.dtype \(--dtype\) must be auto, float32, "
                                               r"bfloat16, float16, got 'int8'$"):
        resolve_compute("cpu", "int8")
    with pytest.raises(CalibrationError, match=r"--device\) 'cuda:1': no CUDA GPU is usable here"):
        resolve_compute("cuda:1", "auto", cuda=False)


def test_float16_on_cpu_warns_once_but_runs(monkeypatch):
    from aim_ray import calibration

    monkeypatch.setattr(calibration, "_warned_fp16_cpu", [])
    with pytest.warns(UserWarning, match="float16 on a CPU"):
        assert resolve_compute("cpu", "fp16") == ("cpu", "float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_compute("cpu", "fp16") == ("cpu", "float16")  # not twice (cached_calibrate + calibrate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bfloat16 on a CPU is fine (fast where the CPU has bf16 instructions)
        resolve_compute("cpu", "bfloat16")


def test_config_carries_and_checks_device_and_dtype(tmp_path):
    cal = CalibrationConfig(device="cuda:0", dtype="bf16")
    assert (cal.device, cal.dtype) == ("cuda:0", "bfloat16")
    assert (CalibrationConfig().device, CalibrationConfig().dtype) == ("auto", "auto")
    path = tmp_path / "m.yaml"
    path.write_text("merge_method: linear\nmodels: [a, b]\naim: {calibration: {device: tpu}}\n")
    with pytest.raises(ConfigError, match=r"aim\.calibration\.device: .*must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        load_merge_config(path)
    with pytest.raises(ValueError, match="calibration.dtype"):
        AimConfig(calibration={"dtype": "float64"})


def test_cli_option_errors_are_one_line(base, data_file, tmp_path):
    run = CliRunner().invoke(main, ["calibrate", str(base), "--out", str(tmp_path / "s.safetensors"),
                                    "--data", str(data_file), "--device", "tpu"])
    assert run.exit_code == 2
    assert run.output.strip() == ("aim-ray: error: calibration.device (--device) must be auto, cpu, cuda or "
                                  "cuda:N, got 'tpu'")
    assert not (tmp_path / "s.safetensors").exists()
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"merge_method: linear\nmodels: [{base}, {base}]\n")
    for args in (["--dtype", "bf16"], ["--device", "cpu"]):
        run = CliRunner().invoke(main, ["merge", str(plain), "--out", str(tmp_path / "out"), *args])
        assert run.exit_code == 2
        assert run.output.strip() == (f"aim-ray: error: --device/--dtype set how the merge calibrates, but "
                                      f"{plain} has no aim section: nothing is calibrated")
    assert not (tmp_path / "out").exists()
    run = CliRunner().invoke(main, ["relax", "--base", str(base), "--merged", str(base), "--omega", "0.5",
                                    "--out", str(tmp_path / "relaxed"), "--dtype", "int4"])
    assert run.exit_code == 2 and "calibration.dtype (--dtype) must be" in run.output
    assert not (tmp_path / "relaxed").exists()


def test_cli_calibrate_records_the_compute_dtype(base, data_file, tmp_path):
    out = tmp_path / "s.safetensors"
    run = CliRunner().invoke(main, ["calibrate", str(base), "--out", str(out), "--data", str(data_file),
                                    "--n-samples", "20", "--block-size", "16", "--n-blocks", "2",
                                    "--device", "cpu", "--dtype", "bf16"])
    assert run.exit_code == 0, run.output
    assert "(bfloat16 on cpu)" in run.output
    from aim_ray.scales import Scales

    meta = Scales.load(out).metadata()
    assert (meta["dtype"], meta["device"]) == ("bfloat16", "cpu")


# ------------------------------------------------------------------------------- half-precision compute


def test_activation_recorder_accumulates_in_float32():
    """4096 bfloat16 tokens: a bfloat16 running sum would be off by ~1e-2; ours matches float64 to 1e-6."""
    lin = nn.Linear(8, 2).to(torch.bfloat16)
    x = (torch.rand(4096, 8, generator=torch.Generator().manual_seed(0)) + 0.5).to(torch.bfloat16)
    recorder = ActivationRecorder({"lin": lin})
    for chunk in x.split(512):
        lin(chunk)
    recorder.remove()
    assert recorder.sums["lin"].dtype == torch.float32
    exact = x.double().abs().mean(0)
    assert float(((recorder.means()["lin"].double() - exact).abs() / exact).max()) < 1e-6
    bf16_sum = torch.zeros(8, dtype=torch.bfloat16)
    for chunk in x.split(512):
        bf16_sum += chunk.abs().sum(0)  # what a bfloat16 accumulator (the reference code's) gives
    assert float(((bf16_sum.double() / 4096 - exact).abs() / exact).max()) > 1e-3


def test_sensitivity_sums_are_float32_in_bf16(base):
    stage = SensitivityStage(StageRunner(base, 0, 4, dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in stage.params.values())
    assert stage.sums and all(s.dtype == torch.float32 for s in stage.sums.values())
    stage.last(_blocks(1))
    assert all(s.dtype == torch.float32 for s in stage.scales().values())


def test_bf16_activation_scales_close_to_float32(base):
    blocks = _blocks()
    ref = collect_activation_scales(base, blocks)
    got = collect_activation_scales(base, blocks, dtype="bfloat16")
    assert all(t.dtype == torch.float32 for t in got.values())
    assert not all(torch.equal(got[k], ref[k]) for k in ref)  # it really computed in bfloat16
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=BF16_ACT_RTOL, atol=0)
    assert _max_da(got, ref) < BF16_ACT_DA


def test_bf16_sensitivity_close_to_float32(base):
    blocks = _blocks(3)
    ref = collect_sensitivity_scales(base, blocks)
    got = collect_sensitivity_scales(base, blocks, dtype="bfloat16")
    assert all(t.dtype == torch.float32 for t in got.values())
    assert 0 < _max_da(got, ref) < BF16_SENS_DA


def test_fp16_sensitivity_is_loss_scaled(base):
    """Without the loss scale float16 gradients underflow (A off by ~0.1 here); with it, ~0.003."""
    blocks = _blocks(3, 64)
    ref = collect_sensitivity_scales(base, blocks)
    got = collect_sensitivity_scales(base, blocks, dtype="float16")
    assert _max_da(got, ref) < 0.01
    assert all(int((got[k] == 0).sum()) == int((ref[k] == 0).sum()) for k in ref)


def test_non_finite_scales_name_the_dtype():
    with pytest.raises(CalibrationError, match=r"calibration in float16 gave non-finite scales for 'lm_head' "
                                               r"\(overflow\?\); use --dtype bfloat16 or float32"):
        check_finite({"model.norm": torch.ones(2), "lm_head": torch.tensor([1.0, float("inf")])}, torch.float16)


def test_cached_bf16_scales_record_their_dtype(base, data_file):
    kw = dict(dataset=str(data_file), n_samples=20, block_size=16, n_blocks=2, device="cpu")
    bf16 = cached_calibrate(base, dtype="bfloat16", **kw)
    fp32 = cached_calibrate(base, dtype="auto", **kw)  # auto on a CPU: float32
    assert (bf16.dtype, bf16.device, fp32.dtype, fp32.device) == ("bfloat16", "cpu", "float32", "cpu")
    assert bf16.metadata()["dtype"] == "bfloat16" and bf16.metadata()["device"] == "cpu"
    assert not all(torch.equal(bf16[k], fp32[k]) for k in fp32)


def test_tune_sweep_carries_device_and_dtype(base, data_file, tmp_path):
    from aim_ray import tune
    from aim_ray.config import TuneSweepConfig
    from aim_ray.scales import Scales

    cal = {"dataset": str(data_file), "n_samples": 20, "block_size": 16, "n_blocks": 2}
    cfg = TuneSweepConfig(base_model=str(base), models=[str(base)], methods=["linear"],
                          calibration={**cal, "device": "cpu", "dtype": "bf16"})
    path, computed = tune.cached_scales(cfg)
    assert computed and Scales.load(path).dtype == "bfloat16"
    fp32 = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"dtype": "auto"})})
    assert tune.cached_scales(fp32)[0] != path  # auto on this CPU: float32, its own key
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base_model: {base}\nmodels: [{base}]\nmethods: [linear]\nscales: {path}\n")
    run = CliRunner().invoke(main, ["tune", str(sweep), "--storage", str(tmp_path / "runs"), "--dtype", "bf16"])
    assert run.exit_code == 2
    assert run.output.strip() == (f"aim-ray: error: --device/--dtype set how the sweep calibrates, but {sweep} "
                                  f"uses scales: nothing is calibrated")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["activation", "sensitivity"])
def test_bf16_on_cuda_close_to_float32_on_cpu(base, kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert resolve_compute() == ("cuda", "bfloat16")
    collect = collect_activation_scales if kind == "activation" else collect_sensitivity_scales
    blocks = _blocks(3)
    cpu32 = collect(base, blocks, dtype="float32", device="cpu")
    gpu32 = collect(base, blocks, dtype="float32", device="cuda")
    gpu16 = collect(base, blocks, dtype="bfloat16", device="cuda")
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in gpu16.values())
    # float32 on cuda vs cpu: summation order only (why they share a cache key)
    assert _max_da(gpu32, cpu32) < 1e-4
    assert _max_da(gpu16, cpu32) < (BF16_ACT_DA if kind == "activation" else BF16_SENS_DA)


def test_dry_run_sizes_the_calibration_it_will_run(tmp_path):
    from aim_ray.driver import ClusterOptions, dry_run_plan, service_plan
    from aim_ray.engine import prepare

    base, [expert] = build_tiny_family(tmp_path / "family", "llama", n_experts=1, num_layers=4)

    def plan(kind: str, dtype: str):
        path = tmp_path / f"{kind}-{dtype}.yaml"
        path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {expert}, "
                        f"parameters: {{weight: 1.0}}}}]\naim: {{kind: {kind}, calibration: {{dtype: {dtype}}}}}\n")
        cfg = load_merge_config(path)
        stages = service_plan(prepare(cfg), ClusterOptions(workers=2), cfg.aim.calibration, kind).workers
        return [w.calib_bytes for w in stages], dry_run_plan(cfg, ClusterOptions(workers=2))

    act32, text = plan("activation", "float32")
    act16, _ = plan("activation", "bfloat16")
    sens32, sens_text = plan("sensitivity", "float32")
    sens16, _ = plan("sensitivity", "bfloat16")
    assert "sensitivity calibration" in sens_text and "pipelined over 2 stage(s)" in sens_text
    assert "'dtype': 'float32'" in text and "'device': 'auto'" in text
    assert all(h < s for h, s in zip(act16 + sens16, act32 + sens32))  # half the weights and activations
    # sensitivity: one 512-token block, but float32 |grad| sums of every weight and every layer's activations
    assert all(s != a for s, a in zip(sens32, act32))
