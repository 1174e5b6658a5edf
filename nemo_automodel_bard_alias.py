"""Import alias ``nemo_automodel.components.models.bard_vl`` -> ``nemo_automodel_bard.models.bard_vl``.

Standard library only: a ``.pth`` file runs ``install()`` at interpreter start (before torch or
NeMo are imported), and ``nemo_automodel_bard/__init__.py`` runs it again. The finder sits at the
front of ``sys.meta_path`` so it answers before NeMo's ``_MissingModelFinder`` (appended at the
end) can raise for an unknown model package. The alias resolves to the *same module objects*.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

ALIAS = "nemo_automodel.components.models.bard_vl"
TARGET = "nemo_automodel_bard.models.bard_vl"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # noqa: ANN001 - already executed under its real name
        return None


class BardVLAliasFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder mapping the NeMo-style import path onto our package."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real = TARGET + fullname[len(ALIAS) :]
        is_package = fullname == ALIAS
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real), is_package=is_package)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    for finder in list(sys.meta_path):
        if type(finder).__name__ == BardVLAliasFinder.__name__ and getattr(finder, "_bard_alias", False):
            sys.meta_path.remove(finder)
    finder = BardVLAliasFinder()
    finder._bard_alias = True  # type: ignore[attr-defined]
    sys.meta_path.insert(0, finder)


install()
