"""Re-export of the stdlib-only import alias (see the top-level ``nemo_automodel_bard_alias``)."""

from nemo_automodel_bard_alias import ALIAS, TARGET, BardVLAliasFinder, install

__all__ = ["ALIAS", "TARGET", "BardVLAliasFinder", "install"]
