"""launch.sh's set-up on every command: the stamp (a dependency change re-installs, nothing else does), a broken
.venv rebuilt, concurrent first runs serialised by the lock, offline bundles refused when a part is missing or
damaged. pip is replaced by a recorder (SUPMAE_SETUP_PIP) and venv creation by a fast one without pip: nothing
is installed, but launch.sh and tools/install run for real."""

from __future__ import annotations

import fcntl
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.setup_testdata import copying_download, launch_copy, machine_env, make_wheel
from tools.install.bundle import Target, make_bundle, parse_size
from tools.install.plan import make_plan
from train.system.builds import build_by_key
from train.system.nvidia import NvidiaInfo

ROOT = Path(__file__).resolve().parents[1]
BASE = Path(getattr(sys, "_base_executable", sys.executable))
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"

FAKE_PIP = """#!/bin/sh
# Records every pip call (and the requirement / constraint files it names) instead of running pip.
echo "pip $*" >> {log}
prev=""
for a in "$@"; do
    if [ "$prev" = "-r" ]; then sed 's/^/  req /' "$a" >> {log}; fi
    if [ "$prev" = "-c" ]; then sed 's/^/  con /' "$a" >> {log}; fi
    prev="$a"
done
if [ -n "$FAKE_PIP_SLEEP" ]; then sleep "$FAKE_PIP_SLEEP"; fi
exit "${{FAKE_PIP_RC:-0}}"
"""
FAKE_BASE_PYTHON = """#!/bin/sh
# The base interpreter, except that `-m venv` makes a venv without running ensurepip (seconds saved per test)
# and puts a stand-in pip package in it.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    echo "venv $*" >> {log}
    shift 2
    {base} -m venv --without-pip "$@" || exit $?
    for d; do :; done
    mkdir -p "$d/lib/python{ver}/site-packages/pip" && : > "$d/lib/python{ver}/site-packages/pip/__init__.py"
    exit 0
fi
exec {base} "$@"
"""


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    pip_log: Path
    venv_log: Path

    @property
    def venv(self) -> Path:
        return self.root / ".venv"

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.root / "launch.sh"), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout, cwd="/")

    def popen(self, *args: str, out: Path, **env: str) -> subprocess.Popen:
        return subprocess.Popen([str(self.root / "launch.sh"), *args], env={**self.env, **env}, cwd="/",
                                stdout=open(out.with_suffix(".out"), "w"), stderr=open(out.with_suffix(".err"), "w"))

    def log(self) -> list[str]:
        return self.pip_log.read_text().splitlines() if self.pip_log.exists() else []

    def installs(self) -> list[list[str]]:
        """Every `pip install -r` call: its line, then its requirement and constraint lines."""
        out: list[list[str]] = []
        for line in self.log():
            if line.startswith("pip install") and " -r " in line:
                out.append([line])
            elif line.startswith("  ") and out:
                out[-1].append(line.strip())
        return out

    def stamp(self) -> dict[str, str]:
        path = self.venv / ".supmae-setup-stamp"
        return dict(line.split("=", 1) for line in path.read_text().splitlines()) if path.exists() else {}

    def edit_pyproject(self, old: str, new: str) -> None:
        path = self.root / "pyproject.toml"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))


@pytest.fixture
def project(tmp_path) -> Project:
    root = launch_copy(tmp_path / "project")
    pip_log, venv_log = tmp_path / "pip.log", tmp_path / "venv.log"
    fake_pip = tmp_path / "fake-pip"
    fake_pip.write_text(FAKE_PIP.format(log=shlex.quote(str(pip_log))))
    fake_python = tmp_path / f"python{PYVER}"
    fake_python.write_text(FAKE_BASE_PYTHON.format(log=shlex.quote(str(venv_log)), base=shlex.quote(str(BASE)),
                                                   ver=PYVER))
    for f in (fake_pip, fake_python):
        f.chmod(0o755)
    env = machine_env(tmp_path, None)  # no NVIDIA driver, whatever machine the tests run on
    env.update(SUPMAE_SETUP_PIP=str(fake_pip), SUPMAE_PYTHON=str(fake_python))
    env.pop("PYTHONPATH", None)
    subprocess.run([str(fake_python), "-m", "venv", str(root / ".venv")], check=True, env=env)
    venv_log.unlink()
    return Project(root, env, pip_log, venv_log)


def _help_ran(res: subprocess.CompletedProcess) -> bool:
    return res.returncode == 0 and "usage: ./launch.sh bench" in res.stdout


def test_the_stamp_is_compared_on_every_command(project):
    res = project.run("bench", "--help")
    assert _help_ran(res), res.stderr
    assert len(project.installs()) == 1
    stamp = project.stamp()
    assert (stamp["torch"], stamp["dali"], stamp["python"], stamp["source"]) == ("cu130", "cuda130", PYVER, "online")
    calls = len(project.log())
    assert _help_ran(project.run("bench", "--help")) and len(project.log()) == calls  # current: no pip at all

    # A `git pull` that changes the dependencies: the next command installs them.
    project.edit_pyproject('    "rich>=13.0",\n', '    "rich>=13.0",\n    "braceexpand>=0.1",\n')
    assert _help_ran(project.run("bench", "--help"))
    assert len(project.installs()) == 2 and "req braceexpand>=0.1" in project.installs()[-1]
    # Other edits of pyproject.toml do not.
    project.edit_pyproject("line-length = 110", "line-length = 100")
    assert _help_ran(project.run("bench", "--help")) and len(project.installs()) == 2

    # A build override re-installs once; without it, the build chosen stays.
    res = project.run("bench", "--help", SUPMAE_TORCH_CUDA="128")
    assert _help_ran(res), res.stderr
    assert len(project.installs()) == 3
    torch_step = [line for line in project.log() if "--index-url" in line]
    assert torch_step[-1].endswith("--index-url https://download.pytorch.org/whl/cu128 torch==2.14.1 "
                                   "torchvision==0.29.1")
    assert "con torch==2.14.1+cu128" in project.installs()[-1]
    assert project.stamp()["torch"] == "cu128"
    assert _help_ran(project.run("bench", "--help", SUPMAE_TORCH_CUDA="128")) and len(project.installs()) == 3
    assert _help_ran(project.run("bench", "--help")) and len(project.installs()) == 3
    res = project.run("bench", "--help", SUPMAE_DALI_CUDA="120")
    assert _help_ran(res) and len(project.installs()) == 4
    assert "req nvidia-dali-cuda120==2.4.0" in project.installs()[-1] and project.stamp()["dali"] == "cuda120"

    # A failed install leaves no stamp: the next command tries again.
    project.edit_pyproject('    "braceexpand>=0.1",\n', "")
    res = project.run("bench", "--help", FAKE_PIP_RC="1")
    assert res.returncode == 1 and "pip failed (exit status 1)" in res.stderr
    assert "./launch.sh setup --offline OUT" in res.stderr and project.stamp() == {}
    assert _help_ran(project.run("bench", "--help")) and len(project.installs()) == 6


def _fake_installed(venv: Path, torch_cuda: str, dali: str) -> None:
    """Make `venv` look as if torch (built for `torch_cuda`) and the DALI package `dali` were installed."""
    site = venv / f"lib/python{PYVER}/site-packages"
    for name, version in (("torch", "2.14.1"), (dali.replace("-", "_"), "2.4.0")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (site / "torch").mkdir()
    (site / "torch" / "version.py").write_text(f"__version__ = '2.14.1'\ncuda: Optional[str] = '{torch_cuda}'\n")


def test_another_build_replaces_the_installed_one(project):
    _fake_installed(project.venv, "13.0", "nvidia-dali-cuda130")
    res = project.run("bench", "--help", SUPMAE_TORCH_CUDA="128", SUPMAE_DALI_CUDA="120")
    assert _help_ran(res), res.stderr
    assert "launch.sh: replacing torch's cu130 build by the cu128 build" in res.stderr
    calls = [line for line in project.log() if line.startswith("pip ")]
    # pip would keep torch 2.14.1 (the version satisfies the pins): the other build goes first; the other DALI
    # package (the same `nvidia.dali` module) goes after.
    assert calls[0] == "pip uninstall --disable-pip-version-check -y -q torch torchvision"
    assert "--index-url https://download.pytorch.org/whl/cu128" in calls[1] and " -r " in calls[2]
    assert calls[3] == "pip uninstall --disable-pip-version-check -y -q nvidia-dali-cuda130"
    assert len(calls) == 4


def _break(venv: Path, how: str) -> str:
    """Break `venv` as `how` says; returns launch.sh's words for the problem."""
    if how == "interpreter missing":
        for p in (venv / "bin").glob("python*"):
            p.unlink()
        return f"its interpreter {venv}/bin/python is missing"
    if how == "other python":
        cfg = venv / "pyvenv.cfg"
        cfg.write_text(cfg.read_text().replace(f"version = {PYVER}", "version = 3.9"))
        return f"its interpreter is Python {PYVER} but it was made with Python 3.9"
    if how == "no pip":
        (venv / f"lib/python{PYVER}/site-packages/pip/__init__.py").unlink()
        return "it has no pip"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["interpreter missing", "other python", "no pip"])
def test_a_broken_venv_is_rebuilt(project, how):
    assert _help_ran(project.run("bench", "--help"))
    (project.venv / "left-over").write_text("x")
    problem = _break(project.venv, how)
    res = project.run("bench", "--help")
    assert _help_ran(res), res.stderr
    assert f"launch.sh: rebuilding {project.venv} ({problem})" in res.stderr
    assert project.venv_log.read_text().startswith(f"venv -m venv --clear {project.venv}")
    assert not (project.venv / "left-over").exists()  # rebuilt, not reused
    assert len(project.installs()) == 2 and project.stamp()["python"] == PYVER


def test_a_venv_that_is_a_link_or_not_a_venv_is_never_rebuilt(project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    project.venv.rename(elsewhere)
    project.venv.symlink_to(elsewhere)
    _break(elsewhere, "no pip")
    res = project.run("bench", "--help")
    assert res.returncode == 2 and f"{project.venv} is a link to {elsewhere} and it has no pip" in res.stderr
    assert (elsewhere / "pyvenv.cfg").exists() and not project.venv_log.exists()

    project.venv.unlink()
    project.venv.mkdir()
    (project.venv / "notes.txt").write_text("mine")
    res = project.run("bench", "--help")
    assert res.returncode == 2 and "is not a virtual environment (no pyvenv.cfg) and not empty" in res.stderr
    assert (project.venv / "notes.txt").read_text() == "mine"


def test_a_missing_venv_is_created_with_a_supported_python(project, tmp_path):
    import shutil

    shutil.rmtree(project.venv)
    res = project.run("bench", "--help")
    assert _help_ran(res) and f"launch.sh: creating {project.venv}" in res.stderr
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\necho 3.10\n")
    old.chmod(0o755)
    shutil.rmtree(project.venv)
    res = project.run("bench", "--help", SUPMAE_PYTHON=str(old))
    assert res.returncode == 2
    assert f"SUPMAE_PYTHON={old} is Python 3.10; Python >= 3.11 and < 3.14 is required" in res.stderr


def test_concurrent_first_runs_take_turns_and_install_once(project, tmp_path):
    # The test holds the set-up lock, as a first run on another node would while it installs.
    with open(project.root / ".venv.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [project.popen("bench", "--help", out=tmp_path / f"run{i}", FAKE_PIP_SLEEP="0.3") for i in range(3)]
        deadline = time.monotonic() + 90
        errs = [tmp_path / f"run{i}.err" for i in range(3)]
        while not all("waiting for it" in e.read_text() for e in errs):
            assert time.monotonic() < deadline, [e.read_text() for e in errs]
            assert all(p.poll() is None for p in procs), [e.read_text() for e in errs]
            time.sleep(0.1)
        assert all(p.poll() is None for p in procs)  # all three wait
        assert project.log() == []
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert all("usage: ./launch.sh bench" in (tmp_path / f"run{i}.out").read_text() for i in range(3))
    assert len(project.installs()) == 1  # one installed, the others reused it
    assert project.stamp()["source"] == "online"


def _bundle(project: Project, tmp_path: Path, part_size: str | None) -> Path:
    wheels = [make_wheel(tmp_path / "src", f"supmae-probe-{c}", payload=6_000, seed=i) for i, c in enumerate("abc")]
    plan = make_plan(project.root / "pyproject.toml", NvidiaInfo(), {}, fresh=True, python=PYVER,
                     torch_build=build_by_key("torch", "130"), dali_build=build_by_key("dali", "130"))
    target = Target(PYVER, platform.machine(), plan.torch.build, plan.dali.build)
    out = tmp_path / "bundle"
    make_bundle(out, plan, target, [], copying_download(wheels), parse_size(part_size) if part_size else None,
                say=lambda m: None)
    return out


def test_setup_offline_reassembles_a_bundle_and_refuses_a_missing_or_damaged_part(project, tmp_path):
    bundle = _bundle(project, tmp_path, "20K")
    parts = sorted((bundle / "parts").iterdir())
    assert len(parts) == 3
    part = parts[1].read_bytes()
    parts[1].unlink()
    res = project.run("setup", "--offline", str(bundle))
    assert res.returncode == 2
    assert f"launch.sh: error: {bundle}: part 2 of 3 (parts/part-001) missing; copy the bundle's parts again" \
        in res.stderr
    parts[1].write_bytes(part[:100] + bytes([part[100] ^ 1]) + part[101:])
    res = project.run("setup", "--offline", str(bundle))
    assert res.returncode == 2 and f"{bundle}: part 2 of 3 (parts/part-001) is damaged" in res.stderr
    assert project.installs() == []  # pip never ran

    parts[1].write_bytes(part)
    res = project.run("setup", "--offline", str(bundle))
    assert res.returncode == 0, res.stderr
    (install,) = project.installs()
    assert " --no-index --find-links " in install[0] and "req nvidia-dali-cuda130==2.4.0" in install
    assert project.stamp()["source"] == f"bundle {bundle}"
    calls = len(project.log())
    assert _help_ran(project.run("bench", "--help")) and len(project.log()) == calls  # offline stays current


def test_setup_offline_refuses_a_bundle_for_other_dependencies(project, tmp_path):
    bundle = _bundle(project, tmp_path, None)
    project.edit_pyproject('    "rich>=13.0",\n', '    "rich>=14.0",\n')
    res = project.run("setup", "--offline", str(bundle))
    assert res.returncode == 2
    assert "was made for other dependencies than pyproject.toml lists now (only in the bundle: ['rich>=13.0']; " \
           "only in pyproject.toml: ['rich>=14.0'])" in res.stderr
    assert os.path.isdir(bundle / "wheels")
