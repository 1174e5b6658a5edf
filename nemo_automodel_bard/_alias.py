"""Re-export of the stdlib-only import alias (see the top-level ``nemo_automodel_bard_alias``)."""

from nemo_automodel_bard_alias import (
    ALIAS,
    AUTO_MODULE,
    AUTO_PROCESSOR_MODULE,
    AUTO_REGISTER_ENV,
    IMPORT_HINT,
    TARGET,
    BardVLAliasFinder,
    BardVLAutoRegisterFinder,
    install,
    register_with_transformers,
)

__all__ = [
    "ALIAS",
    "AUTO_MODULE",
    "AUTO_PROCESSOR_MODULE",
    "AUTO_REGISTER_ENV",
    "IMPORT_HINT",
    "TARGET",
    "BardVLAliasFinder",
    "BardVLAutoRegisterFinder",
    "install",
    "register_with_transformers",
]
