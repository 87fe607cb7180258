#!/usr/bin/env bash
# Single entry point: ./launch.sh SUBCOMMAND [ARGS...]   (./launch.sh help lists them)
# Works from any working directory. Every command first checks the set-up stamp of the project-local .venv (in
# bash, no Python start-up) and (re-)installs when .venv is missing or broken, or when pyproject.toml's
# dependencies, the Python version or a SUPMAE_TORCH_CUDA / SUPMAE_DALI_CUDA choice changed. Concurrent first
# runs (srun over a shared folder) take turns on a lock: one installs, the others wait and reuse it.
# The Python half of the set-up is tools/install (python -m tools.install --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.supmae-setup-stamp"
LOCK="$ROOT/.venv.lock"
SETUP_FORMAT=2  # part of the stamp's key: raise it when the set-up itself changes, and every .venv re-installs once
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() {
    cat <<'EOF'
usage: ./launch.sh SUBCOMMAND [ARGS...]

Set-up and checks
  setup        create .venv and install everything (runs by itself when .venv is missing, broken or stale)
                 ./launch.sh setup --dry-run          what it would install on this machine, and why
                 ./launch.sh setup --offline BUNDLE   install from a bundle, with no network
  bundle       download every wheel for a machine without internet (./launch.sh bundle --help)
  test         run the test suite (extra arguments go to pytest, e.g. ./launch.sh test -k model)
  help         this message

Data
  shard        shard an ImageFolder / ImageNet tar into indexed WebDataset shards   (./launch.sh shard --help)

Training and evaluation
  pretrain     SupMAE / MAE pre-training on 1 GPU .. many nodes                      (./launch.sh pretrain --help)
  finetune     fine-tune a pre-trained encoder
  linprobe     linear probe on a frozen encoder
  knn          k-NN accuracy of a frozen encoder
  export       the encoder for timm / the HF hub / MAE's code                        (./launch.sh export --help)
  visualize    MAE's reconstruction picture of a checkpoint                          (./launch.sh visualize --help)

Measurement
  bench        benchmarks: pipeline, model, kernels, e2e, shard, memory, mixing, compute (compute-to-accuracy)
  demo         the end-to-end demo: built-in data -> shards -> SupMAE vs MAE -> k-NN -> report

Environment (README, "Set-up")
  SUPMAE_TORCH_CUDA=126|128|130|cpu   torch build (default: the newest the NVIDIA driver runs; 130 without one)
  SUPMAE_DALI_CUDA=120|130            DALI build (default: 130 for CUDA 13 drivers and without one, else 120)
  SUPMAE_PYTHON=python3.12            interpreter used to create .venv (default: python3, else python3.13 .. 3.11)
EOF
}

# --- Python ---------------------------------------------------------------------------------------------------------

# The supported versions come from pyproject.toml's requires-python = ">=3.A,<3.B".
python_range() {
    sed -n 's/^requires-python *= *">=\([0-9]*\.[0-9]*\), *<\([0-9]*\.[0-9]*\)".*/\1 \2/p' "$ROOT/pyproject.toml"
}

# 0 when version $1 (3.12) lies in [$2, $3)
version_in() {
    local v=(${1//./ }) lo=(${2//./ }) hi=(${3//./ })
    (( v[0] * 1000 + v[1] >= lo[0] * 1000 + lo[1] && v[0] * 1000 + v[1] < hi[0] * 1000 + hi[1] ))
}

python_version_of() { "$1" -I -S -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# The interpreter that creates .venv: SUPMAE_PYTHON, else the first supported of python3, python3.13 .. 3.11.
base_python() {
    local range lo hi v candidate
    range="$(python_range)"
    [[ -n "$range" ]] || die "pyproject.toml has no requires-python = \">=3.X,<3.Y\" line"
    read -r lo hi <<<"$range"
    if [[ -n "${SUPMAE_PYTHON:-}" ]]; then
        command -v "$SUPMAE_PYTHON" >/dev/null 2>&1 || die "SUPMAE_PYTHON=$SUPMAE_PYTHON is not on the PATH"
        v="$(python_version_of "$SUPMAE_PYTHON")" || die "SUPMAE_PYTHON=$SUPMAE_PYTHON does not run"
        version_in "$v" "$lo" "$hi" || die "SUPMAE_PYTHON=$SUPMAE_PYTHON is Python $v; Python >= $lo and < $hi is required"
        command -v "$SUPMAE_PYTHON"
        return
    fi
    local seen=()
    for candidate in python3 $(for ((m = ${hi#*.} - 1; m >= ${lo#*.}; m--)); do echo "python3.$m"; done); do
        command -v "$candidate" >/dev/null 2>&1 || continue
        v="$(python_version_of "$candidate")" || continue
        if version_in "$v" "$lo" "$hi"; then command -v "$candidate"; return; fi
        seen+=("$candidate is $v")
    done
    die "no Python >= $lo and < $hi on the PATH${seen:+ (${seen[*]})}: install one (e.g. python3.11) or set SUPMAE_PYTHON"
}

# --- .venv ----------------------------------------------------------------------------------------------------------

# major.minor of the Python .venv was made with (pyvenv.cfg)
venv_version() {
    sed -n 's/^version\(_info\)\? *= *\([0-9]*\.[0-9]*\).*/\2/p' "$VENV/pyvenv.cfg" 2>/dev/null | head -n1
}

# Why .venv cannot be used as it is (nothing when it can). Cheap: no Python start-up unless the interpreter's file
# name does not say its version.
venv_problem() {
    if [[ ! -e "$VENV" ]]; then
        [[ -L "$VENV" ]] && echo "it is a link to $(readlink "$VENV"), which does not exist" || echo "it does not exist"
        return
    fi
    [[ -f "$VENV/pyvenv.cfg" ]] || { echo "it has no pyvenv.cfg (not a virtual environment)"; return; }
    local want have real
    want="$(venv_version)"
    [[ -n "$want" ]] || { echo "its pyvenv.cfg names no Python version"; return; }
    [[ -x "$PY" ]] || { echo "its interpreter $PY is missing"; return; }
    real="$(readlink -f "$PY")"
    if [[ "${real##*/}" =~ ^python([0-9]+\.[0-9]+)$ ]]; then
        have="${BASH_REMATCH[1]}"
    else
        have="$(python_version_of "$PY")" || { echo "its interpreter $PY does not start"; return; }
    fi
    [[ "$have" == "$want" ]] || { echo "its interpreter is Python $have but it was made with Python $want"; return; }
    [[ -f "$VENV/lib/python$want/site-packages/pip/__init__.py" ]] || echo "it has no pip"
}

# A missing or broken .venv is made anew (never one that is a link, or a folder that is not a virtual environment).
make_venv() {
    local problem py
    problem="$(venv_problem)"
    [[ -z "$problem" ]] && return
    if [[ -L "$VENV" ]]; then
        die "$VENV is a link to $(readlink "$VENV") and $problem: repair it there, or remove the link to get a new one"
    fi
    if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
        die "$VENV is not a virtual environment (no pyvenv.cfg) and not empty: move it away"
    fi
    py="$(base_python)" || exit 2
    if [[ -e "$VENV" ]]; then
        echo "launch.sh: rebuilding $VENV ($problem) with $py" >&2
    else
        echo "launch.sh: creating $VENV with $py" >&2
    fi
    "$py" -m venv --clear "$VENV" || die "'$py -m venv' failed (on Debian/Ubuntu: install the python3-venv package)"
    problem="$(venv_problem)"
    [[ -z "$problem" ]] || die "the new $VENV cannot be used: $problem"
}

# --- the stamp ------------------------------------------------------------------------------------------------------

# Key of what the set-up depends on: the set-up format, the Python version and pyproject.toml's dependency lines
# (requires-python, dependencies, the optional-dependencies table); other edits of pyproject.toml do not count.
setup_key() {
    {
        echo "format=$SETUP_FORMAT python=$1"
        sed -n -e '/^requires-python/p' -e '/^dependencies *= *\[/,/^\]/p' \
            -e '/^\[project\.optional-dependencies\]/,/^\[/p' "$ROOT/pyproject.toml"
    } | sha256sum | cut -d' ' -f1
}

stamp_value() { sed -n "s/^$1=//p" "$STAMP" 2>/dev/null | head -n1; }

# The stamp tag a build override asks for ("" when the variable is not set).
torch_wanted() { case "${SUPMAE_TORCH_CUDA:-}" in "") ;; cpu) echo cpu ;; *) echo "cu$SUPMAE_TORCH_CUDA" ;; esac; }
dali_wanted() { [[ -z "${SUPMAE_DALI_CUDA:-}" ]] || echo "cuda$SUPMAE_DALI_CUDA"; }

# 0 when .venv is healthy and its stamp matches the dependencies, the Python version and the overrides.
setup_current() {
    [[ -z "$(venv_problem)" && -f "$STAMP" ]] || return 1
    [[ "$(stamp_value key)" == "$(setup_key "$(venv_version)")" ]] || return 1
    local want
    want="$(torch_wanted)"
    [[ -z "$want" || "$want" == "$(stamp_value torch)" ]] || return 1
    want="$(dali_wanted)"
    [[ -z "$want" || "$want" == "$(stamp_value dali)" ]] || return 1
}

# --- the lock -------------------------------------------------------------------------------------------------------

# One set-up at a time per project folder (also across nodes of a shared file system where it supports locks).
take_setup_lock() {
    exec 9>>"$LOCK" || die "cannot open $LOCK"
    command -v flock >/dev/null 2>&1 || { echo "launch.sh: no flock here: concurrent set-ups are not serialised" >&2; return 0; }
    local rc=0
    flock -n -E 75 9 || rc=$?
    if [[ $rc -eq 75 ]]; then
        echo "launch.sh: another ./launch.sh is setting up $VENV; waiting for it" >&2
        rc=0
        flock 9 || rc=$?
    fi
    if [[ $rc -ne 0 ]]; then
        echo "launch.sh: $LOCK cannot be locked (a file system without locks?): concurrent set-ups are not serialised" >&2
    fi
}

release_setup_lock() { exec 9>&-; }  # before exec: the command itself must not hold the lock

# --- set-up ---------------------------------------------------------------------------------------------------------

install_locked() {  # [--offline BUNDLE]
    make_venv
    "$PY" -m tools.install install --pyproject "$ROOT/pyproject.toml" --stamp "$STAMP" \
        --key "$(setup_key "$(venv_version)")" "$@"
}

ensure_setup() {
    setup_current && return
    take_setup_lock
    setup_current || install_locked  # another process may have finished it while this one waited
    release_setup_lock
}

setup_cmd() {
    local dry=0 args=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --dry-run) dry=1 ;;
            --offline)
                [[ $# -ge 2 ]] || die "setup --offline needs the bundle folder"
                [[ -d "$2" ]] || die "setup --offline $2: no such folder"
                args+=(--offline "$(cd "$2" && pwd)"); shift ;;
            -h|--help) echo "usage: ./launch.sh setup [--dry-run] [--offline BUNDLE]   (README, \"Set-up\")"; return ;;
            *) die "setup: unknown option '$1' (./launch.sh setup [--dry-run] [--offline BUNDLE])" ;;
        esac
        shift
    done
    if [[ $dry -eq 1 ]]; then
        if [[ -z "$(venv_problem)" ]]; then
            "$PY" -m tools.install plan --pyproject "$ROOT/pyproject.toml" "${args[@]}"
        else
            local py
            py="$(base_python)" || exit 2
            echo "launch.sh: $VENV would be made with $py" >&2
            "$py" -m tools.install plan --pyproject "$ROOT/pyproject.toml" --fresh "${args[@]}"
        fi
        return
    fi
    take_setup_lock
    install_locked "${args[@]}"
    release_setup_lock
}

bundle_cmd() {
    local py="$PY"
    if [[ -n "$(venv_problem)" ]]; then
        py="$(base_python)" || exit 2
        "$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip: run ./launch.sh setup first, or install pip"
    fi
    exec "$py" -m tools.install bundle --pyproject "$ROOT/pyproject.toml" "$@"
}

run_module() { ensure_setup; exec "$PY" -m "$@"; }

main() {
    local cmd="${1:-help}"
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        help|-h|--help) usage ;;
        setup)    setup_cmd "$@" ;;
        bundle)   bundle_cmd "$@" ;;
        test)     ensure_setup; cd "$ROOT"; exec "$PY" -m pytest "$@" ;;
        shard)    run_module tools.shard "$@" ;;
        pretrain|finetune|linprobe|knn) run_module tools.launch "$cmd" "$@" ;;
        export|visualize) run_module "tools.$cmd" "$@" ;;
        bench)    run_module tools.bench "$@" ;;
        demo)     run_module tools.demo "$@" ;;
        *) echo "launch.sh: unknown subcommand '$cmd'" >&2; echo >&2; usage >&2; exit 2 ;;
    esac
}

# Sourcing the file (tests) defines the functions without running a command.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
