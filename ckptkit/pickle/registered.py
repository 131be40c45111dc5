"""The classes ``ckptkit.safe_globals()`` registers for ``torch.load(weights_only=True)``, by name.

``safe.vetted_globals`` imports them to register them; ``ops/resume_plan_loads`` predicts a load
from their names alone, without importing anything. One table for both, so the prediction is
what the registration does.
"""

from __future__ import annotations

# The vetted classes torch.load needs beyond its defaults, by import path (module, name).
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
# numpy's RNG state (np.random.get_state(), HF rng_state.pth): the array, its dtype and the
# dtype's class, which weights_only checks when BUILD sets the dtype's state.
NUMPY_GLOBALS = (("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.dtypes", "UInt32DType"))
# numpy's _reconstruct lives here (numpy >= 2, numpy < 2); it is registered under both names.
NUMPY_CORES = ("numpy._core.multiarray", "numpy.core.multiarray")
