"""The mae method: its pretraining model (model.py) and its spec (spec.py)."""
