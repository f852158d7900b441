"""charlm: character-level language models from fast.ai's lesson 6, as a library.

The pieces: :mod:`charlm.data` (corpus, vocabulary, batch layouts),
:mod:`charlm.models` (architecture registry), :mod:`charlm.config` (typed
configuration and presets), :mod:`charlm.training` (the loop and its hooks),
:mod:`charlm.checkpoint`, :mod:`charlm.generate` and :mod:`charlm.cli`.
"""

__version__ = "0.1.0"
