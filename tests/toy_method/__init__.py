"""A toy method defined outside the package (issue #16): it registers its spec on import, and its yamls live in
``tests/toy_conf`` (found through ``MIM_LIGHTNING_CONF``). Nothing of ``mim_lightning/`` knows it."""

from toy_method import spec  # noqa: F401  (registers the method)
