"""The mixmae method: its pretraining model (model.py) and its spec (spec.py)."""
