"""Mixed precision under a size budget: a weight-quantization stage's ``budget`` section
(:class:`BitsBudget`), the per-layer sensitivity estimate and the plan that meets it."""

from hfcompress.mixed_precision.config import BitsBudget
from hfcompress.mixed_precision.plan import Choice, PrecisionPlan, plan_by_layer_order, solve_budget

__all__ = ["BitsBudget", "Choice", "PrecisionPlan", "plan_by_layer_order", "solve_budget"]
