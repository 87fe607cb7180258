#!/usr/bin/env bash
# Single entry point: ./launch.sh SUBCOMMAND [ARGS...]   (./launch.sh help lists them)
# Works from any working directory; installs a project-local .venv on first use.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.supmae-setup-stamp"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() {
    cat <<'EOF'
usage: ./launch.sh SUBCOMMAND [ARGS...]

Set-up and checks
  setup        create .venv and install everything (idempotent; runs automatically when .venv is missing)
  test         run the test suite (extra arguments go to pytest, e.g. ./launch.sh test -k model)
  help         this message

Data
  shard        shard an ImageFolder / ImageNet tar into indexed WebDataset shards   (./launch.sh shard --help)

Training and evaluation
  pretrain     SupMAE / MAE pre-training on 1 GPU .. many nodes                      (./launch.sh pretrain --help)
  finetune     fine-tune a pre-trained encoder
  linprobe     linear probe on a frozen encoder
  knn          k-NN accuracy of a frozen encoder

Measurement
  bench        throughput and compute-to-accuracy benchmarks (pipeline, model, kernels, e2e, shard, compute, mixing)
  demo         the end-to-end demo: built-in data -> shards -> SupMAE vs MAE -> k-NN -> report

Environment
  SUPMAE_DALI_CUDA=120|130   pick the DALI wheel (default: from nvidia-smi's CUDA version, 130 without a GPU)
  SUPMAE_PYTHON=python3.11   interpreter used to create .venv
EOF
}

# The DALI wheel must match the driver: cuda130 needs a CUDA 13 driver, cuda120 runs on CUDA 12 drivers.
dali_variant() {
    if [[ -n "${SUPMAE_DALI_CUDA:-}" ]]; then
        case "$SUPMAE_DALI_CUDA" in
            120|130) echo "$SUPMAE_DALI_CUDA"; return ;;
            *) die "SUPMAE_DALI_CUDA must be 120 or 130, got '$SUPMAE_DALI_CUDA'" ;;
        esac
    fi
    local cuda_major=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        cuda_major="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n1 || true)"
    fi
    if [[ -n "$cuda_major" && "$cuda_major" -lt 13 ]]; then echo 120; else echo 130; fi
}

setup() {
    local base_py="${SUPMAE_PYTHON:-python3}"
    command -v "$base_py" >/dev/null 2>&1 || die "no '$base_py' on PATH: install Python 3.10-3.12 or set SUPMAE_PYTHON"
    "$base_py" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' \
        || die "$base_py is $("$base_py" -V 2>&1); Python 3.10-3.12 is required (set SUPMAE_PYTHON)"
    if [[ ! -x "$PY" ]]; then
        echo "launch.sh: creating $VENV"
        "$base_py" -m venv "$VENV"
    fi
    local variant want
    variant="$(dali_variant)"
    want="$(cat "$ROOT/pyproject.toml" <(echo "dali=$variant") | sha256sum | cut -d' ' -f1)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        echo "launch.sh: .venv is up to date (DALI cuda$variant)"
        return
    fi
    local reqs
    reqs="$(mktemp)"
    "$PY" - "$ROOT/pyproject.toml" "$variant" >"$reqs" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
variant = sys.argv[2]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    print(req.replace("nvidia-dali-cuda130", f"nvidia-dali-cuda{variant}"))
PYEOF
    echo "launch.sh: installing into $VENV (DALI cuda$variant); the first time takes a few minutes"
    "$PY" -m pip install --disable-pip-version-check -q -r "$reqs" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    rm -f "$reqs"
    # The other DALI variant must not linger: both provide the same 'nvidia.dali' package.
    local other=$([[ "$variant" == 130 ]] && echo 120 || echo 130)
    if "$PY" -m pip show -q "nvidia-dali-cuda$other" >/dev/null 2>&1; then
        "$PY" -m pip uninstall -y -q "nvidia-dali-cuda$other"
    fi
    echo "$want" >"$STAMP"
    echo "launch.sh: set-up complete"
}

ensure_setup() { [[ -x "$PY" && -f "$STAMP" ]] || setup; }

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    help|-h|--help) usage ;;
    setup) setup ;;
    test)
        ensure_setup
        cd "$ROOT"
        exec "$PY" -m pytest "$@" ;;
    shard)    ensure_setup; exec "$PY" -m tools.shard "$@" ;;
    pretrain) ensure_setup; exec "$PY" -m tools.launch pretrain "$@" ;;
    finetune|linprobe|knn) ensure_setup; exec "$PY" -m tools.launch "$cmd" "$@" ;;
    bench)    ensure_setup; exec "$PY" -m tools.bench "$@" ;;
    demo)     ensure_setup; exec "$PY" -m tools.demo "$@" ;;
    *) echo "launch.sh: unknown subcommand '$cmd'" >&2; echo >&2; usage >&2; exit 2 ;;
esac
