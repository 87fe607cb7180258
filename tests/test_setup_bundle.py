"""Offline bundles: parts, manifest, checks, and an end-to-end install with real pip and no network (a throw-away
venv, wheels the test builds)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.setup_testdata import copying_download, make_wheel
from tools.install.bundle import (
    BundleError,
    Target,
    download_commands,
    make_bundle,
    open_bundle,
    parse_size,
    read_manifest,
    write_parts,
)
from tools.install.installer import up_to_date
from tools.install.plan import make_plan
from train.system.builds import build_by_key
from train.system.nvidia import NvidiaInfo

ROOT = Path(__file__).resolve().parents[1]
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"
ARCH = platform.machine()
TINY_PYPROJECT = """[project]
name = "tiny"
version = "0"
requires-python = ">=3.11,<3.14"
dependencies = ["supmae-probe-a==1.0", "supmae-probe-b==1.0"]

[project.optional-dependencies]
dev = ["supmae-probe-c==1.0"]
"""


def _plan(pyproject: Path, torch: str = "130", dali: str = "130"):
    return make_plan(pyproject, NvidiaInfo(), {}, fresh=True, python=PYVER, torch_build=build_by_key("torch", torch),
                     dali_build=build_by_key("dali", dali))


def test_parse_size():
    assert [parse_size(s) for s in ("60M", "2G", "500MB", "1000", "4k", "3KB")] == [
        60 << 20, 2 << 30, 500_000_000, 1000, 4096, 3000]
    for bad in ("0", "-5M", "60X", "", "1.5G"):
        with pytest.raises(BundleError, match="give a size such as 60M"):
            parse_size(bad)


@pytest.mark.parametrize("sizes, part", [([5000, 7000, 1], 4096), ([4096, 4096], 4096), ([10], 1 << 20),
                                         ([0, 3000, 0, 5000], 1000)])
def test_parts_cut_and_reassemble_exactly(tmp_path, sizes, part):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i, n in enumerate(sizes):
        f = src / f"p{i}-1.0-py3-none-any.whl"
        f.write_bytes(os.urandom(n))
        files.append(f)
    parts = write_parts(files, tmp_path / "b" / "parts", part)
    assert [p["size"] for p in parts][:-1] == [part] * (len(parts) - 1) and 0 < parts[-1]["size"] <= part
    assert sum(p["size"] for p in parts) == sum(sizes)
    for p in parts:
        assert hashlib.sha256((tmp_path / "b" / "parts" / p["name"]).read_bytes()).hexdigest() == p["sha256"]
    manifest = {"format": "supmae-fast-bundle", "version": 1, "target": {"python": PYVER, "arch": ARCH},
                "files": [{"name": f.name, "size": f.stat().st_size,
                           "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files], "parts": parts}
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    work = tmp_path / "work"
    work.mkdir()
    _, wheels = open_bundle(tmp_path / "b", work, PYVER, ARCH)
    for f in files:
        assert (wheels / f.name).read_bytes() == f.read_bytes()


def test_bundle_refuses_an_unsupported_python(tmp_path, capsys):
    from tools.install.__main__ import main

    for bad in ("3.10", "3.14", "3"):
        assert main(["bundle", str(tmp_path / "b"), "--python", bad, "--pyproject", str(ROOT / "pyproject.toml")]) == 2
        assert f"--python {bad}: give a version from 3.11 up to, not including, 3.14" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_download_commands_pin_the_target(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    plan = _plan(tmp_path / "pyproject.toml", "128", "120")
    target = Target("3.13", "aarch64", plan.torch.build, plan.dali.build)
    first, second = download_commands(plan, target, ["pip"], Path("W"), Path("R"), Path("C"))
    for cmd in (first, second):
        assert cmd[:6] == ["pip", "download", "--disable-pip-version-check", "--dest", "W", "--only-binary=:all:"]
        assert ["--python-version", "3.13"] == cmd[6:8] and ["-c", "C"] == cmd[cmd.index("-c"):cmd.index("-c") + 2]
        assert "--platform=manylinux_2_28_aarch64" in cmd and "--platform=manylinux_2_17_aarch64" in cmd
        assert "--platform=manylinux2014_aarch64" in cmd and not any("x86_64" in a for a in cmd)
    assert first[-4:] == ["--index-url", "https://download.pytorch.org/whl/cu128", "torch==2.14.1",
                          "torchvision==0.29.1"]
    assert second[-4:] == ["--find-links", "W", "-r", "R"]
    assert len(download_commands(_plan(tmp_path / "pyproject.toml"), target, ["pip"], Path("W"), Path("R"),
                                 Path("C"))) == 1  # PyPI's torch build: one run


def test_manifest_and_target_checks(tmp_path):
    (tmp_path / "pyproject.toml").write_text(TINY_PYPROJECT)
    plan = _plan(tmp_path / "pyproject.toml")
    wheels = [make_wheel(tmp_path / "src", f"supmae-probe-{c}", payload=3000, seed=i) for i, c in enumerate("abc")]
    out = tmp_path / "b"
    make_bundle(out, plan, Target(PYVER, ARCH, plan.torch.build, plan.dali.build), [], copying_download(wheels),
                say=lambda m: None)
    with pytest.raises(BundleError, match="is not empty: give a new folder"):
        make_bundle(out, plan, Target(PYVER, ARCH, plan.torch.build, plan.dali.build), [], copying_download(wheels))
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(BundleError, match=rf"is for Python {PYVER} but .venv uses Python 3.99: make the bundle "
                                          r"with --python 3.99"):
        open_bundle(out, work, "3.99", ARCH)
    with pytest.raises(BundleError, match=rf"is for {ARCH} machines, this one is sparc"):
        open_bundle(out, work, PYVER, "sparc")
    (out / "wheels" / "stray-1.0-py3-none-any.whl").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"holds files the manifest does not list \(stray-1.0-py3-none-any.whl\)"):
        open_bundle(out, work, PYVER, ARCH)
    (out / "wheels" / "stray-1.0-py3-none-any.whl").unlink()
    damaged = out / "wheels" / wheels[1].name
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")
    with pytest.raises(BundleError, match=rf"wheels/{wheels[1].name} is damaged"):
        open_bundle(out, work, PYVER, ARCH)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][0]["name"] = "../../etc/evil.whl"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"lists a file named '../../etc/evil.whl', which a bundle never holds"):
        read_manifest(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match=r"manifest.json cannot be read .*: copy the bundle again"):
        read_manifest(out)
    (out / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest.json is missing: .* is not a finished bundle"):
        read_manifest(out)


def test_up_to_date_needs_the_key_and_the_installed_builds(tmp_path):
    (tmp_path / "pyproject.toml").write_text(TINY_PYPROJECT)
    plan = _plan(tmp_path / "pyproject.toml")
    installed = type(plan)(plan.python, plan.nvidia, plan.torch, plan.dali, plan.requirements,
                           (plan.torch.build, plan.dali.build))
    stamp = {"key": "k", "torch": "cu130", "dali": "cuda130"}
    assert up_to_date(stamp, "k", installed)
    assert not up_to_date(stamp, "other", installed)
    assert not up_to_date({**stamp, "torch": "cu128"}, "k", installed)
    assert not up_to_date(stamp, "k", plan)  # nothing installed


def _clean_pip_env() -> dict[str, str]:
    """This process's environment without pip settings (the build machine configures indexes): no network use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


@pytest.mark.slow
def test_bundle_split_reassemble_install_end_to_end(tmp_path):
    """Real `pip download` (from a local folder, --no-index) into a split bundle, then the offline set-up with real
    pip into a throw-away venv, with nothing but the parts and the manifest; then a damaged and a missing part."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(TINY_PYPROJECT)
    src = tmp_path / "index"
    wheels = [make_wheel(src, f"supmae-probe-{c}", payload=8000, seed=i) for i, c in enumerate("abc")]
    plan = _plan(pyproject)
    env = _clean_pip_env()
    pip = [sys.executable, "-m", "pip"]
    bundle = tmp_path / "bundle"
    manifest = make_bundle(bundle, plan, Target(PYVER, ARCH, plan.torch.build, plan.dali.build), pip,
                           lambda cmd: subprocess.run(cmd, env=env, check=True, capture_output=True),
                           parse_size("16K"), extra=("--no-index", "--find-links", str(src)), say=lambda m: None)
    assert sorted(f["name"] for f in manifest["files"]) == sorted(w.name for w in wheels)
    for f in manifest["files"]:
        assert f["sha256"] == hashlib.sha256((src / f["name"]).read_bytes()).hexdigest()
    total = sum(w.stat().st_size for w in wheels)
    assert len(manifest["parts"]) == -(-total // (16 << 10)) and not (bundle / "wheels").exists()
    assert json.loads((bundle / "manifest.json").read_text()) == manifest

    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    vpy = venv / "bin" / "python"
    stamp = tmp_path / "stamp"

    def offline_setup() -> subprocess.CompletedProcess:
        # The installer runs in the new venv's own interpreter (standard library only); pip installs into it.
        return subprocess.run(
            [str(vpy), "-m", "tools.install", "install", "--offline", str(bundle), "--pyproject", str(pyproject),
             "--stamp", str(stamp), "--key", "k1"],
            env={**env, "PYTHONPATH": str(ROOT), "SUPMAE_SETUP_PIP": f"{sys.executable} -m pip --python {vpy}",
                 "SUPMAE_NVIDIA_PROC": str(tmp_path / "no-proc"), "PATH": str(tmp_path / "no-bin") + ":/usr/bin:/bin"},
            capture_output=True, text=True, timeout=300)

    part = bundle / "parts" / "part-001"
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    res = offline_setup()
    assert res.returncode == 2 and f"part 2 of {len(manifest['parts'])} (parts/part-001) is damaged" in res.stderr
    part.unlink()
    res = offline_setup()
    assert res.returncode == 2 and f"part 2 of {len(manifest['parts'])} (parts/part-001) missing" in res.stderr
    assert not stamp.exists()
    part.write_bytes(good)

    res = offline_setup()
    assert res.returncode == 0, res.stderr
    check = subprocess.run([str(vpy), "-c", "import supmae_probe_a as a, supmae_probe_b as b, supmae_probe_c as c; "
                            "print(len(a.DATA), len(b.DATA), len(c.DATA))"], capture_output=True, text=True)
    assert check.stdout.split() == ["8000"] * 3, check.stderr
    assert stamp.read_text() == f"key=k1\ntorch=cu130\ndali=cuda130\npython={PYVER}\nsource=bundle {bundle}\n"
