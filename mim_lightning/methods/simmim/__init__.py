"""The simmim method: its pretraining model (``model.py``) and its spec (``spec.py``, registered on import)."""

from mim_lightning.methods.simmim import spec  # noqa: F401  (registers the method)
