"""The itpn method: its pretraining model (``model.py``) and its spec (``spec.py``, registered on import)."""

from mim_lightning.methods.itpn import spec  # noqa: F401  (registers the method)
