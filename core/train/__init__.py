"""Training: the fit loop and its parts (augmentation, losses, sampler, distributed), cross-validation, and the
replay of the shipped model. Nothing outside ``train.py``, the benchmarks and the tests imports this package: the
dashboard and the audits only read what training wrote (``tests/test_layers.py`` checks it)."""
