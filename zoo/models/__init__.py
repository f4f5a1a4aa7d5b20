"""Model families, one module each; importing this package registers them with zoo and timm.

Every public module here is imported, so a new family is one new file (plus its catalogue
lines in ``zoo/catalogue.py``); modules whose names start with ``_`` are shared machinery.
"""

import importlib
import pkgutil


def _import_families() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()
