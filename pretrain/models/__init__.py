"""Model families by name: the registry the trainer looks `model.type` up in.

A family brings its config section (a pydantic class whose `type` field is a Literal of its name), its
builder (architecture only: no ranks, no DeepSpeed), its parameter counts and FLOPs per unit of work
(for throughput, MFU and scaling-law metrics). Released-weights adapters live in `pretrain.hub`. Several names may share one builder: `gpt2`, `llama` and `bert` are presets of one
Transformer. Families register when their module is imported; the modules are listed at the bottom.
"""

from pretrain.models import dit as _dit  # noqa: E402,F401,I001  (registers dit)
from pretrain.models import transformer as _transformer  # noqa: E402,F401  (registers gpt2, llama, bert)
from pretrain.models import moe_presets as _moe_presets  # noqa: E402,F401  (registers mixtral, qwen2_moe, qwen3_moe, olmoe)
from pretrain.models.family import Family, get_family, register, registered  # noqa: F401
