"""Scaling laws: fits of loss against parameters, tokens and compute (Chinchilla approaches 2 and 3).

`table` reads the points (run directories' summary.json, or a CSV of a published ladder), `fit` fits them
(approach 3's parametric law with bootstrap intervals, approach 2's isoFLOP minima, the compute-optimal
frontier), `plots` draws them, `cli` is `pretrain scaling ...`.
"""


from pretrain.errors import ScalingError  # noqa: F401  (raised as pretrain.scaling.ScalingError)
