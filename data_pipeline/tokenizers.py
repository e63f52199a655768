"""Tokenizers: normalised DNA bytes <-> token ids.

Shards store bases, not token ids, so the tokenizer can change without re-sharding. Each
tokenizer is registered by name (``data.tokenizer``), saved as ``tokenizer.json`` beside every
export, and reports how many bases each token stands for so that losses convert to bits per
base whatever the tokenization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucleo import alphabet
from nucleo.registry import TOKENIZERS


@dataclass
class CharTokenizerConfig:
    """The character tokenizer has no settings; the vocabulary is ``nucleo.alphabet.VOCAB``."""


@TOKENIZERS.register("char", config=CharTokenizerConfig)
class CharTokenizer:
    """One token per base: A C G T N plus <pad> <mask> <bos> <eos> (ids in nucleo.alphabet)."""

    name = "char"
    vocab: tuple[str, ...] = alphabet.VOCAB
    pad_id = alphabet.PAD
    mask_id = alphabet.MASK
    bos_id = alphabet.BOS
    eos_id = alphabet.EOS
    n_id = alphabet.N

    def __init__(self, config: CharTokenizerConfig | None = None) -> None:
        table = np.full(256, alphabet.N, dtype=np.int64)
        for i, base in enumerate(alphabet.BASES + "N"):
            table[ord(base)] = i
            table[ord(base.lower())] = i
        self._table = table

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def complement_ids(self) -> list[int]:
        """Permutation of the vocabulary that complements every base token."""
        return list(alphabet.COMPLEMENT_IDS)

    @property
    def bases_per_token(self) -> np.ndarray:
        """[V] float: bases each token stands for (1 for A C G T N, 0 for specials)."""
        out = np.zeros(self.vocab_size, dtype=np.float32)
        out[: alphabet.N + 1] = 1.0
        return out

    def encode(self, seq: bytes | bytearray | str | np.ndarray) -> np.ndarray:
        """[L] int64 ids of a normalised sequence (bytes ``b"ACGTN"`` or a uint8 array)."""
        if isinstance(seq, str):
            seq = seq.encode("ascii")
        codes = seq if isinstance(seq, np.ndarray) else np.frombuffer(seq, dtype=np.uint8)
        return self._table[codes]

    def decode(self, ids: Any) -> str:
        """The bases of ``ids`` as a string; special tokens are dropped."""
        ids = np.asarray(ids).reshape(-1)
        return "".join(self.vocab[i] for i in ids if i <= alphabet.N)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "vocab": list(self.vocab)}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def build_tokenizer(name: str) -> Any:
    """A tokenizer by registry name (``char``)."""
    entry = TOKENIZERS.get(name)
    return entry.cls(entry.config())


def load_tokenizer(directory: str | Path) -> Any:
    """Load ``tokenizer.json`` from an export directory and check its vocabulary."""
    path = Path(directory) / "tokenizer.json"
    spec = json.loads(path.read_text())
    tokenizer = build_tokenizer(spec.get("type", ""))
    if list(spec.get("vocab", [])) != list(tokenizer.vocab):
        raise ValueError(f"{path}: vocabulary differs from this version's {spec['type']!r}")
    return tokenizer
