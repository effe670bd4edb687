"""Named image datasets: one registry, checked sources, a uint8 array cache.

    from ood_lib.data import load_dataset
    ds = load_dataset("fashion_mnist", "train")   # ImageArrays: x (N, H, W, C) uint8, y (N,) int64

- `arrays.py`: ImageArrays (arrays + name, split, content checksum), DatasetMissing, DatasetCorrupt.
- `sources.py`: one small class per on-disk format (IDX, Animal-MNIST pickles, CIFAR pickles, SVHN .mat,
  ImageFolder roots, .tar.gz of ImageFolder roots, torchvision download), looked for in OOD_DATA_ROOT,
  then data_dir()/raw, then a system location. Images from files are resized to 32x32 (PIL bilinear)
  when they are not 32x32 already, mimicking the papers' Resize((32, 32)).
- `registry.py`: DatasetSpec (sources in order, counts, shape, classes, ood_split, hint), DATASETS,
  load_dataset, and the cache `data_dir()/cache/<name>-<split>.npz`.

Environment: OOD_DATA_ROOT (searched first), OOD_DATA_DIR (raw downloads and caches; default data/),
OOD_DOWNLOAD=1 (let torchvision download CIFAR-10/100, SVHN, MNIST, Fashion-MNIST; needs a network).

CLI: python -m ood_lib.data --prepare fashion_mnist mnist animal_mnist
"""
from ood_lib.data.arrays import DatasetCorrupt, DatasetMissing, ImageArrays, array_checksum
from ood_lib.data.registry import DATASETS, DatasetSpec, class_names, load_dataset
from ood_lib.data.sources import (AnimalMnistPickles, CifarPickles, IdxFiles, ImageFolder, Source, SvhnMat,
                                  TarImageFolder, TorchvisionDownload)

__all__ = ["ImageArrays", "DatasetSpec", "DATASETS", "load_dataset", "class_names", "DatasetMissing", "DatasetCorrupt",
           "array_checksum", "Source", "IdxFiles", "AnimalMnistPickles", "CifarPickles", "SvhnMat", "ImageFolder",
           "TarImageFolder", "TorchvisionDownload"]
