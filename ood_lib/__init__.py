"""ood_lib: a slim library behind the intrinsic-OOD-detection study notebooks."""
__version__ = "0.1.0"
