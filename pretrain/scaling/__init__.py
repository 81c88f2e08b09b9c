"""Scaling laws: fits of loss against parameters, tokens and compute (Chinchilla approaches 2 and 3).

`table` reads the points (run directories' summary.json, or a CSV of a published ladder), `fit` fits them
(`approach3`: the parametric law with bootstrap intervals; `approach2`: the isoFLOP minima; the
compute-optimal frontier), `plots` draws them, `report` writes fit.json. `ladder` plans an isoFLOP ladder,
`runner` runs it. `hyper` fits learning-rate and batch laws to a sweep, `recommend` turns a fit into a run at a
budget, `check` compares a finished run with its prediction (`saved` reads fit.json back for both).
`pretrain scaling ...` is pretrain.cli.scaling (and pretrain.cli.scaling_decide).
"""


from pretrain.errors import ScalingError  # noqa: F401  (raised as pretrain.scaling.ScalingError)
