"""nemo_automodel_bard: Bard-VL block-diffusion vision-language models for NeMo-AutoModel.

Importing the package installs the ``nemo_automodel.components.models.bard_vl`` import alias and
registers Bard-VL with transformers' Auto classes and NeMo-AutoModel's architecture registry.
Subpackages: ``diffusion`` (masks, noise, losses; pure torch), ``models``, ``decoding``, ``data``,
``recipes`` and ``pipeline``.
"""

from ._alias import install as _install_alias

_install_alias()

from .models.bard_vl import (  # noqa: E402 - the alias must exist first
    BardVLConfig,
    BardVLForConditionalGeneration,
    BardVLProcessor,
    BardVLTextConfig,
)

__version__ = "0.1.0"
__all__ = ["BardVLConfig", "BardVLForConditionalGeneration", "BardVLProcessor", "BardVLTextConfig", "__version__"]
