"""The explainers, one package per method behind one interface (:mod:`cefam_lightning.methods.base`), looked up
by name in the registry (:mod:`cefam_lightning.methods.registry`).

Importing this package registers every built-in method: each subpackage's ``method`` module (``cefam/method.py``,
``lcam/method.py``, ``siam/method.py``, and any new ``<name>/method.py``) is imported, and registers its method(s)
with :func:`~cefam_lightning.methods.registry.register_method`. Nothing else needs editing for a new method.
"""

import importlib
import pkgutil

for _package in pkgutil.iter_modules(__path__):
    if _package.ispkg and importlib.util.find_spec(f"{__name__}.{_package.name}.method") is not None:
        importlib.import_module(f"{__name__}.{_package.name}.method")
