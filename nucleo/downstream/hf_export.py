"""The Hugging Face side of a saved classifier: its tokenizer files, its transformers classes
and config.json's keys for ``AutoModelForSequenceClassification`` (``trust_remote_code``).

Imports no transformers: saving works without it installed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline.tokenizers import load_tokenizer
from nucleo.train.export import add_hf_files

CLASSIFIER_MODULE = "modeling_nucleo_classifier.py"  # a copy of hf_classifier.py


def classifier_config(
    export: str | Path, out: Path, info: dict[str, Any], hidden_size: int
) -> dict[str, Any]:
    """Write ``export``'s tokenizer (nucleo's and Hugging Face's files) and the transformers
    classes into ``out``; return ``export``'s config.json with the keys transformers reads for
    a classifier (``info``: classifier.json's ``classes`` and ``layer``) on ``hidden_size``-wide
    pooled states. Old exports (without those keys, or with a nucleo-format tokenizer.json)
    are brought up to date."""
    classes: Sequence[Any] = info.get("classes", [])
    meta = json.loads((Path(export) / "config.json").read_text())
    tokenizer = load_tokenizer(export)
    tokenizer.save(out)
    meta = add_hf_files(out, meta, tokenizer)
    shutil.copyfile(Path(__file__).with_name("hf_classifier.py"), out / CLASSIFIER_MODULE)
    labels = [str(c) for c in classes]
    module = CLASSIFIER_MODULE.removesuffix(".py")
    auto_map = {
        **meta["auto_map"],
        "AutoModelForSequenceClassification": f"{module}.NucleoForSequenceClassification",
    }
    return {
        **meta,
        "architectures": ["NucleoForSequenceClassification"],
        "auto_map": auto_map,
        "hidden_size": int(hidden_size),
        "id2label": dict(enumerate(labels)),
        "label2id": {c: i for i, c in enumerate(labels)},
        "pooling_layer": int(info.get("layer", -1)),
    }
