"""Block-sparse attention. So far the layouts (``layout.py``, pure functions); the attention
function, its kernels and the recipe stage are still to come (issue 13)."""
