"""bf16 safeguards (a bf16 weight keeps 8 significant bits, so small Adam steps round away): predict
lost updates (`check_bf16`), keep them (`guard_bf16`), and count the ones lost while training
(`LostUpdateCounter`, the `lost_updates` monitor). Routers and routing statistics stay fp32 by
construction (`Fp32Module`, `MoeLayer`)."""

from moeify.precision.counter import LostUpdateCounter, LostUpdateReading
from moeify.precision.guards import METHODS, Bf16Guard, MasterWeights, StochasticRounding, guard_bf16
from moeify.precision.preflight import (
    Bf16Report,
    GroupPrediction,
    TensorPrediction,
    check_bf16,
    lost_probability,
    warn_if_lossy,
)
from moeify.precision.rounding import FORMATS, FloatFormat, spacing, stochastic_round_to_bf16

__all__ = [
    "FORMATS",
    "METHODS",
    "Bf16Guard",
    "Bf16Report",
    "FloatFormat",
    "GroupPrediction",
    "LostUpdateCounter",
    "LostUpdateReading",
    "MasterWeights",
    "StochasticRounding",
    "TensorPrediction",
    "check_bf16",
    "guard_bf16",
    "lost_probability",
    "spacing",
    "stochastic_round_to_bf16",
    "warn_if_lossy",
]
