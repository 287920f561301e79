#!/usr/bin/env bash
# The project's two set-up commands, for a fresh Debian machine with Python 3.11:
#   ./run.sh demo   runs the main job on the embedded default data (Fashion-MNIST)
#   ./run.sh test   runs lint and the test suite
# Each creates its own virtual environment (.venv) from pyproject.toml on first use.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
FMNIST=/usr/share/datasets/fashion-mnist
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
    echo "installing Debian packages: $*" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

ensure_venv() {
    local stamp="$VENV/.installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
        apt_install python3-venv
    fi
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # trt-rtx: NVIDIA's TensorRT-RTX builder, which parses and builds engines without a GPU.
    "$VENV/bin/python" -m pip install -q -e ".[dev,trt-rtx]"
    touch "$stamp"
}

ensure_data() {
    if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -z "${COMPRESS_EDGE_DATA:-}" ]; then
        apt_install dataset-fashion-mnist
    fi
}

ensure_browser() {
    # The browser test of 'compress-edge serve' drives Debian's headless chromium (never a downloaded one).
    if ! command -v chromium >/dev/null 2>&1; then
        apt_install chromium
    fi
}

case "${1:-}" in
    test)
        shift
        ensure_venv
        ensure_data
        ensure_browser
        "$VENV/bin/ruff" check .
        if printf '%s\n' "$@" | grep -q '^tests/'; then
            "$VENV/bin/pytest" "$@"
        else
            # OpenVINO's tests get a pytest process of their own: after the hundreds of tests before
            # them have loaded torch, onnxruntime, FAISS and TensorRT-RTX into one process, OpenVINO
            # there ended the whole suite in a segmentation fault (alone they pass, as every command
            # does in the fresh process a user starts).
            "$VENV/bin/pytest" "$@" --ignore=tests/test_export_openvino.py
            "$VENV/bin/pytest" "$@" tests/test_export_openvino.py
        fi
        ;;
    demo)
        shift
        ensure_venv
        ensure_data
        "$VENV/bin/compress-edge" demo "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [options]   |   ./run.sh test [pytest options]" >&2
        exit 2
        ;;
esac
