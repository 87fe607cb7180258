"""The torch / DALI build choice of `./launch.sh setup`, from recorded nvidia-smi outputs (no install)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.setup_testdata import H100, RECORDED, fake_proc, launch_copy, machine_env
from tools.install.plan import make_plan, requirement_name, requirements_for
from train.system.builds import (
    DALI_BUILDS,
    PlanError,
    build_by_key,
    choose,
    installed_torch,
    torch_build_of,
    torch_fix,
)
from train.system.nvidia import NvidiaInfo, detect_nvidia, driver_cuda, parse_smi_header, parse_smi_list

ROOT = Path(__file__).resolve().parents[1]


# --- what the driver shows --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, gpus, driver, cuda", [
    ("r470-cuda11.4", ["NVIDIA A100-SXM4-40GB"], "470.182.03", (11, 4)),
    ("r535-cuda12.2", ["NVIDIA A100-SXM4-80GB"] * 4, "535.104.05", (12, 2)),
    ("r550-cuda12.4", [H100] * 8, "550.54.15", (12, 4)),
    ("r570-cuda12.8", [H100] * 8, "570.124.06", (12, 8)),
    ("r580-cuda13.0", ["NVIDIA H200"] * 8, "580.65.06", (13, 0)),
    ("r550-mig", ["NVIDIA A100-SXM4-40GB"], "550.54.15", (12, 4)),
])
def test_detect_reads_recorded_nvidia_smi_outputs(tmp_path, name, gpus, driver, cuda):
    info = detect_nvidia(machine_env(tmp_path, RECORDED[name]))
    assert info == NvidiaInfo(tuple(gpus), driver, cuda, "nvidia-smi")


def test_no_devices_is_believed_over_proc(tmp_path):
    # nvidia-smi sees no GPU (a job without GPUs on a GPU node); /proc still lists the node's GPUs.
    proc = fake_proc(tmp_path / "proc", "550.54.15", [H100] * 8)
    info = detect_nvidia(machine_env(tmp_path, RECORDED["no-devices"], proc))
    assert info.gpus == () and info.driver == "550.54.15" and info.cuda == (12, 4)


@pytest.mark.parametrize("failure", ["version-mismatch", "no-driver"])
def test_failing_nvidia_smi_falls_back_to_proc(tmp_path, failure):
    proc = fake_proc(tmp_path / "proc", "570.124.06", [H100, H100])
    info = detect_nvidia(machine_env(tmp_path, RECORDED[failure], proc))
    assert info.gpus == (H100, H100) and info.driver == "570.124.06" and info.cuda == (12, 8)
    assert info.source == str(proc) and info.problem.startswith("nvidia-smi failed: ")
    assert RECORDED[failure].listing.splitlines()[0] in info.problem


def test_no_nvidia_smi_and_no_proc_is_no_gpu(tmp_path):
    env = machine_env(tmp_path, None)
    env["PATH"] = str(tmp_path / "empty")  # no nvidia-smi at all
    assert detect_nvidia(env) == NvidiaInfo()
    assert not detect_nvidia(machine_env(tmp_path, None)).gpus  # nvidia-smi failing, no /proc


def test_parsers_and_driver_branches():
    assert parse_smi_list(RECORDED["r550-mig"].listing) == ("NVIDIA A100-SXM4-40GB",)
    assert parse_smi_header("no header here") == (None, None)
    assert [driver_cuda(d) for d in ("580.65.06", "575.57.08", "570.86.10", "565.57.01", "560.28.03", "555.42.02",
                                     "550.54.15", "535.104.05", "525.60.13", "520.61.05", "450.51.06", "440.33.01",
                                     "x", None)] == [
        (13, 0), (12, 9), (12, 8), (12, 7), (12, 6), (12, 5), (12, 4), (12, 2), (12, 0), (11, 8), (11, 0), None,
        None, None]


# --- the choice ---------------------------------------------------------------------------------------------------------

def _tags(info: NvidiaInfo, torch_override=None, dali_override=None, installed=None):
    return choose("torch", info, torch_override, installed).build.tag, choose("dali", info, dali_override).build.tag


@pytest.mark.parametrize("name, torch_tag, dali_tag", [
    ("r580-cuda13.0", "cu130", "cuda130"),
    ("r575-cuda12.9", "cu128", "cuda120"),
    ("r570-cuda12.8", "cu128", "cuda120"),
    ("r560-cuda12.6", "cu126", "cuda120"),
])
def test_the_build_follows_the_drivers_cuda_version(tmp_path, name, torch_tag, dali_tag):
    info = detect_nvidia(machine_env(tmp_path, RECORDED[name]))
    assert _tags(info) == (torch_tag, dali_tag)
    torch = build_by_key("torch", torch_tag.removeprefix("cu"))
    assert torch.index == (None if torch_tag == "cu130" else f"https://download.pytorch.org/whl/{torch_tag}")


def test_no_driver_keeps_todays_install_or_what_is_installed():
    assert _tags(NvidiaInfo()) == ("cu130", "cuda130")
    cu128 = build_by_key("torch", "128")
    choice = choose("torch", NvidiaInfo(), None, cu128)  # a login node of a cluster set up for CUDA 12.8 nodes
    assert choice.build == cu128 and "kept" in choice.reason


def test_an_installed_build_the_driver_runs_is_kept_one_it_cannot_is_replaced():
    r580, r570 = NvidiaInfo((H100,), "580.65.06", (13, 0)), NvidiaInfo((H100,), "570.124.06", (12, 8))
    cu128, cu130, cpu = (build_by_key("torch", k) for k in ("128", "130", "cpu"))
    assert choose("torch", r580, None, cu128).build == cu128  # no back-and-forth between nodes of two drivers
    assert choose("torch", r570, None, cu130).build == cu128  # CUDA 13.0 cannot run on a 12.8 driver
    assert choose("torch", r570, None, cpu).build == cu128  # a GPU machine gets a GPU build
    assert choose("dali", r570, None, build_by_key("dali", "130")).build.tag == "cuda120"


def test_overrides_win_and_warn_when_the_driver_cannot_run_them():
    r570 = NvidiaInfo((H100,), "570.124.06", (12, 8))
    choice = choose("torch", r570, "130")
    assert choice.build.tag == "cu130" and choice.reason == "SUPMAE_TORCH_CUDA=130"
    assert "needs a driver supporting CUDA 13.0 (R580 or newer)" in choice.warnings[0]
    assert "runs need --device cpu" in choose("torch", r570, "cpu").warnings[0]
    assert choose("torch", NvidiaInfo(), "126").warnings == ()
    assert choose("dali", r570, "130").build.tag == "cuda130"
    with pytest.raises(PlanError, match=r"SUPMAE_TORCH_CUDA='121' is not a build: choose one of 130, 128, 126, cpu"):
        choose("torch", r570, "121")
    with pytest.raises(PlanError, match=r"SUPMAE_DALI_CUDA='110'.*130, 120"):
        choose("dali", r570, "110")


@pytest.mark.parametrize("name", ["r550-cuda12.4", "r535-cuda12.2", "r470-cuda11.4"])
def test_a_driver_older_than_cuda_12_6_is_refused_with_what_is_supported(tmp_path, name):
    info = detect_nvidia(machine_env(tmp_path, RECORDED[name]))
    with pytest.raises(PlanError) as e:
        choose("torch", info)
    msg = str(e.value)
    assert f"the NVIDIA driver {info.driver} supports CUDA {info.cuda_version}" in msg
    assert "torch is built for CUDA 12.6, 12.8, 13.0" in msg and "(R560 or newer)" in msg
    assert "SUPMAE_TORCH_CUDA=cpu ./launch.sh setup" in msg and "SUPMAE_TORCH_CUDA=126 ./launch.sh setup" in msg
    dali = choose("dali", info)  # DALI's CPU operators still work: a warning, not a refusal
    assert dali.build.tag == "cuda120" and (info.cuda >= (12, 0)) == (dali.warnings == ())


def test_torch_build_of_and_installed_torch():
    assert torch_build_of("12.8") == build_by_key("torch", "128")
    assert torch_build_of(None).tag == "cpu"
    assert torch_build_of("12.9").tag == "cu129" and torch_build_of("12.9").cuda == (12, 9)
    import torch

    assert installed_torch() == torch_build_of(torch.version.cuda)  # read from torch/version.py, not imported


def test_the_runtime_fix_names_the_right_build():
    r570 = NvidiaInfo((H100,), "570.124.06", (12, 8))
    assert "SUPMAE_TORCH_CUDA=128 ./launch.sh setup" in torch_fix(r570, "13.0")
    assert "SUPMAE_TORCH_CUDA=128 ./launch.sh setup" in torch_fix(r570, None)  # a CPU-only build
    assert "update the NVIDIA driver to R560 or newer" in torch_fix(NvidiaInfo((H100,), "550.1", (12, 4)), "13.0")
    assert "hidden (CUDA_VISIBLE_DEVICES) or the driver does not work" in torch_fix(r570, "12.8")


# --- the plan -----------------------------------------------------------------------------------------------------------

def test_plan_swaps_the_dali_package_and_pins_torch_to_its_build():
    info = NvidiaInfo((H100,), "570.124.06", (12, 8))
    plan = make_plan(ROOT / "pyproject.toml", info, {}, fresh=True)
    assert "nvidia-dali-cuda120==2.4.0" in plan.requirements
    assert not any(requirement_name(r) == "nvidia-dali-cuda130" for r in plan.requirements)
    assert plan.torch_lines == ["torch==2.14.1", "torchvision==0.29.1"]
    assert plan.constraints == ["torch==2.14.1+cu128", "torchvision==0.29.1+cu128"]
    plan = make_plan(ROOT / "pyproject.toml", NvidiaInfo(), {"SUPMAE_TORCH_CUDA": "cpu"}, fresh=True)
    assert plan.constraints == ["torch==2.14.1+cpu", "torchvision==0.29.1+cpu"]
    assert plan.torch.build.index == "https://download.pytorch.org/whl/cpu"
    assert requirements_for(["Nvidia_DALI_cuda130==2.4.0"], DALI_BUILDS[1]) == ["Nvidia_DALI_cuda130==2.4.0"]


def test_the_installer_runs_on_the_standard_library_alone(tmp_path):
    # launch.sh runs it with the interpreter of a .venv that has nothing installed yet (-S: no site-packages).
    env = machine_env(tmp_path, RECORDED["r570-cuda12.8"])
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-S", "-m", "tools.install", "plan", "--fresh", "--json"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert (plan["torch"], plan["torch_index"], plan["dali"]) == ("cu128", "https://download.pytorch.org/whl/cu128",
                                                                  "cuda120")
    assert plan["nvidia"]["gpus"] == [H100] * 8


@pytest.mark.parametrize("name, expect, rc", [
    ("r580-cuda13.0", ["cu130 (CUDA 13.0) from PyPI", "nvidia-dali-cuda130==2.4.0"], 0),
    ("r570-cuda12.8", ["cu128 (CUDA 12.8) from https://download.pytorch.org/whl/cu128",
                       "nvidia-dali-cuda120==2.4.0"], 0),
    ("r560-cuda12.6", ["cu126 (CUDA 12.6) from https://download.pytorch.org/whl/cu126"], 0),
    ("r550-cuda12.4", ["error: the NVIDIA driver 550.54.15 supports CUDA 12.4"], 2),
    (None, ["cu130 (CUDA 13.0) from PyPI", "no NVIDIA driver found"], 0),
])
def test_launch_setup_dry_run_with_a_fake_nvidia_smi(tmp_path, name, expect, rc):
    # The real launch.sh and installer, a stand-in nvidia-smi on PATH; nothing is created or installed.
    root = launch_copy(tmp_path / "clone")
    env = machine_env(tmp_path, RECORDED[name] if name else None)
    env["SUPMAE_PYTHON"] = sys.executable
    res = subprocess.run([str(root / "launch.sh"), "setup", "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=60, cwd="/")
    out = res.stdout + res.stderr
    assert res.returncode == rc, out
    for text in expect:
        assert text in out
    assert not (root / ".venv").exists() and not (root / ".venv.lock").exists()


def test_dry_run_honours_the_overrides(tmp_path):
    env = {**machine_env(tmp_path, RECORDED["r550-cuda12.4"]), "SUPMAE_TORCH_CUDA": "cpu", "SUPMAE_DALI_CUDA": "120",
           "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "tools.install", "plan", "--fresh"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "cpu (CPU only) from https://download.pytorch.org/whl/cpu; SUPMAE_TORCH_CUDA=cpu" in res.stdout
    assert "nvidia-dali-cuda120==2.4.0: SUPMAE_DALI_CUDA=120" in res.stdout
    assert "warning    SUPMAE_TORCH_CUDA=cpu: a CPU-only build on a machine with 8 x NVIDIA H100" in res.stdout
    env["SUPMAE_DALI_CUDA"] = "99"
    res = subprocess.run([sys.executable, "-m", "tools.install", "plan", "--fresh"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2 and "launch.sh: error: SUPMAE_DALI_CUDA='99' is not a build" in res.stderr
