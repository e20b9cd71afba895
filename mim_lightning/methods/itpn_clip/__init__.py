"""The itpn_clip method: its pretraining model (model.py) and its spec (spec.py)."""
