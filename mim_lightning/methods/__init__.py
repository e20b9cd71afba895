"""Methods: one package per method (``methods/<name>/``: ``model.py``, ``spec.py``, ``__init__.py``).

Each package registers its :class:`~mim_lightning.methods.spec.MethodSpec` when it is imported; the rest of the
app finds a method only through :func:`spec_named`, :func:`spec_for_model` or :func:`spec_for_target` (the
``method.model._target_`` of a config or of a checkpoint's stored config), never by testing a method's name.
A method defined outside the package (e.g. under ``tests/``) registers itself the same way.
"""

from mim_lightning.methods.spec import (MethodSpec, all_specs, register, spec_for_checkpoint, spec_for_model,
                                        spec_for_target, spec_named)

__all__ = ["MethodSpec", "all_specs", "register", "spec_for_checkpoint", "spec_for_model", "spec_for_target",
           "spec_named"]
