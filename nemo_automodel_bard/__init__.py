"""nemo_automodel_bard: Bard-VL block-diffusion vision-language models for NeMo-AutoModel.

Importing the package installs the ``nemo_automodel.components.models.bard_vl`` import alias. The model
classes (``BardVLConfig``, ``BardVLForConditionalGeneration``, ``BardVLProcessor``, ``BardVLTextConfig``) are
imported on first use, and with them Bard-VL is registered with transformers' Auto classes and NeMo-AutoModel's
architecture registry. Until then the import stays light (the ``bard-vl`` command answers ``--help`` without
torch): the alias hook registers light stand-ins with transformers' Auto classes as soon as transformers loads
them, and NeMo finds the architecture through its entry point. When transformers' Auto modules are already
imported, or the automatic registration is switched off (``NEMO_AUTOMODEL_BARD_AUTO_REGISTER=0``), importing the
package registers the real classes at once.

Subpackages: ``diffusion`` (masks, noise, losses; pure torch), ``decoding``, ``models``, ``objectives``,
``data``, ``fixtures``, ``recipes`` and ``pipeline`` (docs/design.md).
"""

import os as _os
import sys as _sys

from ._alias import AUTO_MODULE, AUTO_PROCESSOR_MODULE, AUTO_REGISTER_ENV
from ._alias import install as _install_alias

_install_alias()

__version__ = "0.1.0"
_MODEL_EXPORTS = ("BardVLConfig", "BardVLForConditionalGeneration", "BardVLProcessor", "BardVLTextConfig")
__all__ = [*_MODEL_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from .models import bard_vl

        return getattr(bard_vl, name)
    raise AttributeError(f"module 'nemo_automodel_bard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODEL_EXPORTS])


if _os.environ.get(AUTO_REGISTER_ENV, "1") == "0" or AUTO_MODULE in _sys.modules \
        or AUTO_PROCESSOR_MODULE in _sys.modules:
    # nothing will register stand-ins later: register the real classes now
    from .models import bard_vl as _bard_vl  # noqa: E402, F401
