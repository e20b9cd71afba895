"""The small-scale study of ``scripts/reproduce_small.py``: what it runs (:mod:`.study`), how each run is made
and read (:mod:`.runs`) and the report it writes (:mod:`.report`)."""
