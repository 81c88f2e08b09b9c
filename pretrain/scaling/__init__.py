"""Scaling laws: fits of loss against parameters, tokens and compute (Chinchilla approaches 2 and 3).

`table` reads the points (run directories' summary.json, or a CSV of a published ladder), `fit` fits them
(`approach3`: the parametric law with bootstrap intervals; `approach2`: the isoFLOP minima; the
compute-optimal frontier), `plots` draws them, `report` writes fit.json. `ladder` plans an isoFLOP ladder,
`runner` runs it. `pretrain scaling ...` is pretrain.cli.scaling.
"""


from pretrain.errors import ScalingError  # noqa: F401  (raised as pretrain.scaling.ScalingError)
