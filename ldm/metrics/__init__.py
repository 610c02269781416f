"""Measurements of generated images that need no downloaded network: Fréchet distance (fd.py), a small CIFAR-10
classifier whose features it is computed in (cifar_net.py), the CIFAR-10 parquet split as tensors (cifar_data.py).

Nothing heavy is imported here; import the submodules.
"""
