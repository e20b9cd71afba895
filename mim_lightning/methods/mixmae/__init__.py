"""The mixmae method: its pretraining model (``model.py``) and its spec (``spec.py``, registered on import)."""

from mim_lightning.methods.mixmae import spec  # noqa: F401  (registers the method)
