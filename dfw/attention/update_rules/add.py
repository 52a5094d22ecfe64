"""The additive update of the linear transformer (Katharopoulos et al. 2020): no gates, no new parameters.

    S_t = S_{t-1} + phi(k_t)^T v_t

The decaying recurrence with no decay: the `UpdateRule` defaults run it.
"""

from __future__ import annotations

from .base import UpdateRule


class AddRule(UpdateRule):
    name = "add"
    plain_sum = True
