"""The methods: one module per method, ``<name>4sft.py``, each runnable as a script.

A method module holds the paper's update rule (its docstring), its typed settings and a
``build()``; the shared training loop is ``stages/core/sft.py``. Code that only some methods run
lives here beside them, not in the core, so a change to it re-runs only those methods' rows:

* ``zeroth_order.py`` (MeZO, ZO-AdaMU, ZO-Adam), ``projection.py`` (GaLore's groups, AdaRankGrad),
  ``adalomo.py``, ``cimeo.py``, ``gorp.py`` (GORP and O-LoRA's layers), ``loran.py``,
  ``loretta.py`` + ``tensor_train.py``, ``adapter_layers.py`` (layers no library carries),
  ``encoder.py`` (the encoder table's classification loop);
* ``build_corda.py``, ``build_cimeo_masks.py``: the decompose steps of CorDA and CIMEO.
"""

import stages.core  # noqa: E402,F401  (offline flags and thread settings, before any method imports torch)
