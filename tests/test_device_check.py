"""A GPU that torch cannot use stops every command on --device auto before any work (exit 2, with the driver's
CUDA version, torch's build and the fix); every run records its environment. The machine is a stand-in
nvidia-smi on PATH and torch is told it sees no GPU, so these hold on CPU and GPU machines alike."""

from __future__ import annotations

import pytest
import torch

import tools.bench.__main__ as bench
import tools.demo
import tools.launch
import train.pretrain
from tests.setup_testdata import H100, RECORDED, fake_proc, machine_env
from tools.bench import compute as bench_compute
from train.system.device import DeviceError, check_device, describe_environment, environment_record
from train.system.nvidia import NvidiaInfo


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """machine(name): this process sees the recorded nvidia-smi output `name` and a torch built for CUDA 13.0
    that cannot use the GPU (the build newer than a 12.x driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def use(name: str | None, proc=None) -> None:
        for k, v in machine_env(tmp_path / (name or "none"), RECORDED[name] if name else None, proc).items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    return use


def test_auto_stops_on_a_gpu_torch_cannot_use_with_the_fix(machine):
    machine("r570-cuda12.8")
    with pytest.raises(DeviceError) as e:
        check_device("auto")
    msg = str(e.value)
    assert msg.startswith(f"this machine has 8 x {H100}, driver 570.124.06 (CUDA 12.8), but torch "
                          f"{torch.__version__} (built for CUDA 13.0) cannot use it")
    assert "Fix: install the build for this driver: SUPMAE_TORCH_CUDA=128 ./launch.sh setup; or run on the CPU " \
           "anyway with --device cpu" in msg
    with pytest.raises(DeviceError, match="update the NVIDIA driver to R560 or newer"):
        machine("r550-cuda12.4")
        check_device("auto")
    check_device("cpu")  # --device cpu insists


def test_auto_is_the_cpu_without_a_gpu_or_with_the_gpus_hidden(machine, monkeypatch, tmp_path):
    machine(None)
    check_device("auto")
    machine("no-devices")
    check_device("auto")
    with pytest.raises(DeviceError, match=r"--device cuda but torch .* sees no GPU and none was found"):
        check_device("cuda")
    machine("r580-cuda13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    check_device("auto")
    with pytest.raises(DeviceError, match="cannot use it"):
        check_device("cuda")


def test_a_broken_driver_seen_in_proc_also_stops(machine, tmp_path):
    machine("version-mismatch", fake_proc(tmp_path / "proc", "580.65.06", ["NVIDIA H200"]))
    with pytest.raises(DeviceError) as e:
        check_device("auto")
    assert "1 x NVIDIA H200, driver 580.65.06 (CUDA 13.0)" in str(e.value)
    assert "nvidia-smi failed: Failed to initialize NVML: Driver/library version mismatch" in str(e.value)
    assert "the GPUs are hidden (CUDA_VISIBLE_DEVICES) or the driver does not work" in str(e.value)


def test_commands_stop_before_any_work(machine, tmp_path, tiny_shards, capsys):
    machine("r570-cuda12.8")
    shards, _ = tiny_shards
    out = tmp_path / "run"
    for main, argv in [(tools.launch.main, ["pretrain", "--data", str(shards), "--out", str(out)]),
                       (tools.launch.main, ["knn", "--ckpt", "random", "--model", "mae_vit_tiny_patch16", "--data", str(shards),
                                            "--eval-data", str(shards), "--out", str(out)]),
                       (train.pretrain.main, ["--data", str(shards), "--out", str(out)]),
                       (tools.demo.main, ["--quick", "--out", str(out)]),
                       (bench.main, ["model", "--models", "mae_vit_tiny_patch16"]),
                       (bench.main, ["e2e", "--data", str(shards)])]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error: this machine has 8 x NVIDIA H100 80GB HBM3, driver 570.124.06 (CUDA 12.8)" in err, argv
        assert "SUPMAE_TORCH_CUDA=128 ./launch.sh setup" in err and "--device cpu" in err
        assert not out.exists(), argv
    # The launcher checks once, before it starts any process (--dry-run stops right after its checks).
    assert tools.launch.main(["pretrain", "--dry-run", "--data", str(shards), "--out", str(out)]) == 2
    assert "SUPMAE_TORCH_CUDA=128 ./launch.sh setup" in capsys.readouterr().err
    # --device cpu insists: the launcher gets past the check.
    assert tools.launch.main(["pretrain", "--dry-run", "--data", str(shards), "--out", str(out), "--device",
                              "cpu"]) == 0


def test_benchmarks_that_use_no_device_are_not_stopped():
    assert bench_compute.device_of(type("A", (), {"runs": ["r"], "device": "auto"})()) is None
    assert bench_compute.device_of(type("A", (), {"runs": None, "device": "auto"})()) == "auto"


def test_environment_record():
    nvidia = NvidiaInfo((H100,) * 8, "580.65.06", (13, 0), "nvidia-smi")
    rec = environment_record(torch.device("cpu"), fused_masking="off", compile=False, nvidia=nvidia)
    assert rec["device"] == "cpu" and rec["gpu"] is None and rec["gpu_count"] == 0 and rec["machine_gpus"] == 8
    assert (rec["driver"], rec["driver_cuda"], rec["torch"], rec["torch_cuda"]) == (
        "580.65.06", "13.0", torch.__version__, torch.version.cuda)
    assert (rec["fused_masking"], rec["compile"]) == ("off", False)
    line = describe_environment(rec)
    assert line.startswith("environment: cpu, machine: 8 NVIDIA GPU(s), driver 580.65.06 (CUDA 13.0), torch ")
    assert line.endswith("fused masking off, compile off")
    assert "no NVIDIA GPU" in describe_environment(environment_record(torch.device("cpu"), nvidia=NvidiaInfo()))


def test_device_cpu_starts_one_process_per_node_on_a_gpu_node(tiny_shards, tmp_path, monkeypatch, capsys):
    """--device cpu on a node with visible GPUs: one process (not one per GPU) unless --nproc asks for more."""
    shards, _ = tiny_shards
    monkeypatch.setattr(tools.launch, "_visible_gpus", lambda: 8)
    monkeypatch.setattr(tools.launch, "check_device", lambda device: None)
    argv = ["pretrain", "--dry-run", "--data", str(shards), "--out", str(tmp_path / "run")]
    assert tools.launch.main([*argv, "--device", "cpu"]) == 0
    assert "1 node(s) x 1 process(es)" in capsys.readouterr().err
    assert tools.launch.main([*argv, "--device", "cpu", "--nproc", "2"]) == 0
    assert "1 node(s) x 2 process(es)" in capsys.readouterr().err
    assert tools.launch.main(argv) == 0
    assert "1 node(s) x 8 process(es)" in capsys.readouterr().err
