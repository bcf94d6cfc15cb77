"""Which Keras backend will run, and whether it sees a GPU.

Kept apart from the loader so the Keras segmenter (which the loader imports) can use it
without importing its importer back.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)


def keras_backend_name() -> str:
    """The Keras backend that will be used, defaulting to JAX where TensorFlow is absent.

    Keras itself defaults to TensorFlow and fails to import without it (the GPU image ships
    JAX only), so with no explicit choice and no TensorFlow, pick JAX before keras loads.
    """
    if "keras" in sys.modules:
        import keras

        return str(keras.backend.backend())
    if (
        "KERAS_BACKEND" not in os.environ
        and importlib.util.find_spec("tensorflow") is None
        and importlib.util.find_spec("jax") is not None
    ):
        os.environ["KERAS_BACKEND"] = "jax"
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def nvidia_present() -> bool:
    """An NVIDIA driver is loaded here (its device nodes or its /proc entry): the one GPU probe
    that imports nothing (the re-stream asks it before trying NVENC)."""
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")
    return any(os.path.exists(p) for p in nodes)


def _gpu_device_nodes() -> bool:
    """Cheap pre-check: NVIDIA or ROCm device nodes, or an explicit override."""
    if os.environ.get("SEGSTREAM_ASSUME_GPU") == "1":
        return True
    return nvidia_present() or os.path.exists("/dev/kfd")


def gpu_visible() -> bool:
    """Whether the configured Keras backend sees a GPU (imports that backend)."""
    if not _gpu_device_nodes():
        return False  # skip a multi-second framework import on plain CPU machines
    backend = keras_backend_name()
    try:
        if backend == "jax":
            if importlib.util.find_spec("jax") is None:
                return False
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "tensorflow":
            if importlib.util.find_spec("tensorflow") is None:
                return False
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception as e:  # a broken CUDA install must not stop a CPU start-up
        log.warning("GPU probe on Keras backend %s failed: %s", backend, e)
    return False
