"""omniret_jax: a JAX/Flax trainer for unified audio-video-text retrieval embedders.

Layers, each importing only from those below it (tests/test_layers.py enforces it):
``train``/``eval`` (entry points) -> ``build`` (model factory, placement on a mesh) ->
``convert``/``step``/``checkpoint`` -> ``losses``/``sharding`` -> ``data`` (host) | ``model``
(device) -> ``config``/``inputs`` (the dataclasses both sides read).
"""
