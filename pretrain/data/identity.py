"""What data a run trained on, in a few strings: corpus hashes and weights of its sources, the tokenizer,
the objective. Two runs compare equal here when a scaling fit may pool them."""

from __future__ import annotations

import json
from pathlib import Path


def identity(cfg: dict) -> dict[str, str | None]:
    """data, tokenizer and objective of a run from its config tree (as in config.yaml): the train sources'
    corpus hashes and weights, their manifests' tokenizer name and hash, objective.type. The trainer puts
    it in summary.json (pretrain/train/loop.py), scaling fits compare it (pretrain/scaling/table.py); None where nothing says."""
    sources = (cfg.get("data") or {}).get("train") or []
    parts, tokenizers = [], set()
    for src in sources if isinstance(sources, list) else [sources]:
        path, weight = (src.get("path"), src.get("weight", 1.0)) if isinstance(src, dict) else (src, 1.0)
        manifest = Path(str(path)) / "index.json"
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            parts.append(f"{path}*{weight}")
            continue
        parts.append(f"{str(m['corpus_sha256'])[:16] if m.get('corpus_sha256') else path}*{weight}")
        if m.get("tokenizer"):
            tokenizers.add(f"{m['tokenizer']}:{str(m.get('tokenizer_sha256', ''))[:12]}")
    objective = (cfg.get("objective") or {}).get("type")
    return {"data": "+".join(parts) or None, "tokenizer": "|".join(sorted(tokenizers)) or None,
            "objective": str(objective) if objective else None}
