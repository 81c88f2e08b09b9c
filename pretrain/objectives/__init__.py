"""What a model is trained to do: objectives by name (`objective.type`), and the interface the loop uses.

An objective declares the data kind it reads (`tokens`, later `images`, `chat`) and the unit its
throughput counts (`tokens`, `images`); checks the data against the model before anything starts;
turns a raw batch into model inputs (`prepare`, a pure function of the batch and its sample positions,
so anything random per sample is reproduced by a resume at any world size); and turns (model, batch)
into (loss sum, unit count, metrics), with every metric a (sum, count) pair. The loop adds sums and
counts over micro-batches and ranks and divides once, so batches whose units differ are weighted
correctly. It also evaluates and makes the end-of-run artefact (a text sample for language models).
"""

from pretrain.objectives import causal_lm as _causal_lm  # noqa: E402,F401,I001  (registers causal_lm)
from pretrain.objectives import ddpm as _ddpm  # noqa: E402,F401  (registers ddpm)
from pretrain.objectives import masked_lm as _masked_lm  # noqa: E402,F401  (registers masked_lm)
from pretrain.objectives import rectified_flow as _rectified_flow  # noqa: E402,F401  (registers rectified_flow)
from pretrain.objectives import sft as _sft  # noqa: E402,F401  (registers sft)
from pretrain.objectives.base import (  # noqa: F401
    Metrics,
    Objective,
    ObjectiveError,
    add_metrics,
    build_objective,
    get_objective,
    register,
    registered,
)
