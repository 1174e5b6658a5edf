"""Import alias ``nemo_automodel.components.models.bard_vl`` -> ``nemo_automodel_bard.models.bard_vl``.

Standard library only: a ``.pth`` file runs ``install()`` at interpreter start (before torch or
NeMo are imported), and ``nemo_automodel_bard/__init__.py`` runs it again. The finder sits at the
front of ``sys.meta_path`` so it answers before NeMo's ``_MissingModelFinder`` (appended at the
end) can raise for an unknown model package. The alias resolves to the *same module objects*.

It also registers Bard-VL with transformers' Auto classes without an explicit import of our package:
when ``transformers.models.auto.configuration_auto`` (the module behind ``AutoConfig``, which every
other Auto class and ``pipeline`` import) has been executed, :func:`register_with_transformers`
registers light stand-ins for ``model_type`` ``bard_vl`` / ``bard_vl_text``; loading a Bard-VL config
through one imports ``nemo_automodel_bard``, whose import registers the real classes (config, model,
processor) with transformers' public ``register`` APIs. Nothing in transformers is replaced or patched.
Set ``NEMO_AUTOMODEL_BARD_AUTO_REGISTER=0`` to turn this off (then ``import nemo_automodel_bard`` before
loading a Bard-VL checkpoint).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import warnings

ALIAS = "nemo_automodel.components.models.bard_vl"
TARGET = "nemo_automodel_bard.models.bard_vl"
#: transformers module after whose execution Bard-VL is registered with the Auto classes
AUTO_MODULE = "transformers.models.auto.configuration_auto"
#: ... and the module behind ``AutoProcessor`` (it looks processor classes up by their saved name)
AUTO_PROCESSOR_MODULE = "transformers.models.auto.processing_auto"
#: environment variable that turns the automatic registration off ("0")
AUTO_REGISTER_ENV = "NEMO_AUTOMODEL_BARD_AUTO_REGISTER"
IMPORT_HINT = (
    "import nemo_automodel_bard (or from nemo_automodel.components.models.bard_vl import "
    "BardVLForConditionalGeneration) before loading a Bard-VL checkpoint with transformers' Auto classes"
)


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


def _real_config_class(model_type: str):
    """Import ``nemo_automodel_bard`` (its import registers the real classes) and return the config class."""
    if os.environ.get(AUTO_REGISTER_ENV, "1") == "0":
        raise ImportError(f"Bard-VL auto-registration is off ({AUTO_REGISTER_ENV}=0): {IMPORT_HINT}")
    try:
        module = importlib.import_module(TARGET + ".configuration_bard_vl")
        importlib.import_module("nemo_automodel_bard")
    except ImportError as exc:
        raise ImportError(
            f"could not import nemo_automodel_bard to load a {model_type!r} checkpoint ({exc}); {IMPORT_HINT}"
        ) from exc
    return module.BardVLConfig if model_type == "bard_vl" else module.BardVLTextConfig


def _lazy_config_class(base, model_type: str):  # noqa: ANN001 - transformers' PreTrainedConfig
    """A stand-in registered for ``model_type`` until first use; every use returns the real class's result."""

    def __new__(cls, *args, **kwargs):  # noqa: ANN001, N807
        return _real_config_class(model_type)(*args, **kwargs)

    def from_dict(cls, *args, **kwargs):  # noqa: ANN001
        return _real_config_class(model_type).from_dict(*args, **kwargs)

    def from_pretrained(cls, *args, **kwargs):  # noqa: ANN001
        return _real_config_class(model_type).from_pretrained(*args, **kwargs)

    namespace = {
        "model_type": model_type,
        "__new__": __new__,
        "from_dict": classmethod(from_dict),
        "from_pretrained": classmethod(from_pretrained),
        "__doc__": f"Stand-in for the {model_type!r} config of nemo_automodel_bard (imported on first use).",
        "__module__": __name__,
    }
    return type(f"LazyBardVLConfig_{model_type}", (base,), namespace)


_STAND_INS: dict[str, type] = {}


def _real_processor_class():
    _real_config_class("bard_vl")
    return importlib.import_module(TARGET + ".processing_bard_vl").BardVLProcessor


def _lazy_processor_class():
    """A stand-in named ``BardVLProcessor`` (the name our checkpoints save); loading imports the real class."""

    def from_pretrained(cls, *args, **kwargs):  # noqa: ANN001
        return _real_processor_class().from_pretrained(*args, **kwargs)

    def __new__(cls, *args, **kwargs):  # noqa: ANN001, N807
        return _real_processor_class()(*args, **kwargs)

    namespace = {
        "from_pretrained": classmethod(from_pretrained),
        "__new__": __new__,
        "__doc__": "Stand-in for nemo_automodel_bard's BardVLProcessor (imported on first use).",
        "__module__": __name__,
    }
    return type("BardVLProcessor", (), namespace)


def register_processor_with_transformers() -> None:
    """Register a ``BardVLProcessor`` stand-in with ``AutoProcessor`` (light; warns, never raises)."""
    if os.environ.get(AUTO_REGISTER_ENV, "1") == "0":
        return
    try:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, AutoProcessor

        if any(getattr(p, "__name__", None) == "BardVLProcessor" for p in PROCESSOR_MAPPING._extra_content.values()):
            return  # the real class (or a stand-in) is registered already
        register_with_transformers()
        config = _STAND_INS.get("bard_vl")
        if config is not None:
            AutoProcessor.register(config, _lazy_processor_class(), exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - must never break transformers' own import
        warnings.warn(f"Bard-VL was not registered with transformers ({exc!r}); {IMPORT_HINT}", stacklevel=2)


def register_with_transformers() -> None:
    """Register stand-ins for ``bard_vl`` / ``bard_vl_text`` with ``AutoConfig`` (light; warns, never raises).

    Called right after ``transformers.models.auto.configuration_auto`` has been executed, possibly in
    the middle of another import of transformers, so nothing heavy is imported here. The first use of
    a stand-in (``AutoConfig.from_pretrained`` of a Bard-VL directory, which every Auto class and
    ``pipeline`` does first) imports ``nemo_automodel_bard``, whose import registers the real config,
    model and processor classes in their place through transformers' public ``register`` APIs.
    """
    if os.environ.get(AUTO_REGISTER_ENV, "1") == "0":
        return
    try:
        from transformers.configuration_utils import PreTrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

        for model_type in ("bard_vl", "bard_vl_text"):
            if model_type not in CONFIG_MAPPING:  # the real class may be registered already
                _STAND_INS[model_type] = _lazy_config_class(PreTrainedConfig, model_type)
                AutoConfig.register(model_type, _STAND_INS[model_type], exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - must never break transformers' own import
        warnings.warn(f"Bard-VL was not registered with transformers ({exc!r}); {IMPORT_HINT}", stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps the real loader of a transformers Auto module: execute it, then register our stand-ins."""

    def __init__(self, loader, after) -> None:  # noqa: ANN001 - importlib protocol
        self._loader = loader
        self._after = after

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001 - importlib protocol
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name: str):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class BardVLAutoRegisterFinder(importlib.abc.MetaPathFinder):
    """Finds the Auto modules with the other finders and wraps their loaders (see :class:`_RegisterAfterExec`)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        after = _AFTER.get(fullname)
        if after is None:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_bard_alias", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _RegisterAfterExec):
                    spec.loader = _RegisterAfterExec(spec.loader, after)
                return spec
        return None


_AFTER = {AUTO_MODULE: register_with_transformers, AUTO_PROCESSOR_MODULE: register_processor_with_transformers}


def _is_ours(finder) -> bool:  # noqa: ANN001
    return type(finder).__name__ in (BardVLAliasFinder.__name__, BardVLAutoRegisterFinder.__name__) and getattr(
        finder, "_bard_alias", False
    )


def install() -> None:
    """Put the alias finder (and the Auto-class registration finder) first on ``sys.meta_path`` (idempotent)."""
    for finder in list(sys.meta_path):
        if _is_ours(finder):
            sys.meta_path.remove(finder)
    finders = [BardVLAliasFinder()]
    if AUTO_MODULE not in sys.modules or AUTO_PROCESSOR_MODULE not in sys.modules:
        # (for a module already imported, our package import registers by itself)
        finders.append(BardVLAutoRegisterFinder())
    for finder in reversed(finders):
        finder._bard_alias = True  # type: ignore[attr-defined]
        sys.meta_path.insert(0, finder)


install()
