"""QPP: static, dynamic and predicted per-sample activation QPs (uniform and Dense+Sparse)."""

from qpp.predict.activation_qps import (
    ActivationQPs,
    ActivationQPSettings,
    configure_activation_qps,
    load_activation_qps,
    settings_from_config,
)

__all__ = [
    "ActivationQPSettings",
    "ActivationQPs",
    "configure_activation_qps",
    "load_activation_qps",
    "settings_from_config",
]
