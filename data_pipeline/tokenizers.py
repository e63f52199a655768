"""Tokenizers: normalised DNA bytes <-> token ids.

Shards store bases, not token ids, so the tokenizer can change without re-sharding. Each
tokenizer is registered by name (``data.tokenizer``), saved beside every export and run as
``nucleo_tokenizer.json`` plus a Hugging Face twin (``tokenizer.json``, ``tokenizer_config.json``:
``data_pipeline.hf_tokenizer``), and reports how many bases each token stands for so that losses
convert to bits per base whatever the tokenization.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import hf_tokenizer
from nucleo.core import alphabet
from nucleo.core.registry import TOKENIZERS
from nucleo.core.schema import check, from_dict


@dataclass
class CharTokenizerConfig:
    """The character tokenizer has no settings; the vocabulary is ``nucleo.core.alphabet.VOCAB``."""


@TOKENIZERS.register("char", config=CharTokenizerConfig)
class CharTokenizer:
    """One token per base: A C G T N plus <pad> <mask> <bos> <eos> (ids in nucleo.core.alphabet)."""

    name = "char"
    vocab: tuple[str, ...] = alphabet.VOCAB
    max_bases_per_token = 1
    pad_id = alphabet.PAD
    mask_id = alphabet.MASK
    bos_id = alphabet.BOS
    eos_id = alphabet.EOS
    n_id = alphabet.N

    @staticmethod
    def special_ids() -> tuple[int, int, int, int, int]:
        """(pad, mask, bos, eos, N) ids, shared by every tokenizer built on this alphabet."""
        return alphabet.PAD, alphabet.MASK, alphabet.BOS, alphabet.EOS, alphabet.N

    def __init__(self, config: CharTokenizerConfig | None = None) -> None:
        table = np.full(256, alphabet.N, dtype=np.int64)
        for i, base in enumerate(alphabet.BASES + "N"):
            table[ord(base)] = i
            table[ord(base.lower())] = i
        self._table = table
        self._bytes_table = bytes(table.astype(np.uint8))  # for bytes.translate

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
        raw = seq.tobytes() if isinstance(seq, np.ndarray) else bytes(seq)
        # a byte-translation table, then one widening copy: ~1.8x numpy fancy indexing
        ids = np.frombuffer(raw.translate(self._bytes_table), dtype=np.uint8)
        out = np.empty(len(ids), dtype=np.int64)
        np.copyto(out, ids)
        return out

    def encode_compact(self, seq: bytes | bytearray | np.ndarray) -> np.ndarray:
        """[L] uint8 ids: the byte translation alone, no widening copy (the loader widens
        while it fills the batch, so this is the tokenization step it pays for)."""
        raw = seq.tobytes() if isinstance(seq, np.ndarray) else bytes(seq)
        return np.frombuffer(raw.translate(self._bytes_table), dtype=np.uint8)

    def decode(self, ids: Any) -> str:
        """The bases of ``ids`` as a string; special tokens are dropped."""
        ids = np.asarray(ids).reshape(-1)
        return "".join(self.vocab[i] for i in ids if i <= alphabet.N)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "vocab": list(self.vocab)}

    def save(self, directory: str | Path) -> Path:
        """Write nucleo_tokenizer.json and the Hugging Face files; the first one's path."""
        hf = hf_tokenizer.word_level(self.vocab)
        return hf_tokenizer.save(directory, self.to_json(), hf, indent=2)


@dataclass
class KmerTokenizerConfig:
    """k: bases per k-mer token (4^k k-mer tokens; Nucleotide Transformer uses 6)."""

    k: int = 6

    def __post_init__(self) -> None:
        check(1 <= self.k <= 8, "k", f"must be in 1..8 (4^k tokens), got {self.k}")


@TOKENIZERS.register("kmer", config=KmerTokenizerConfig)
class KmerTokenizer:
    """Non-overlapping k-mers, as in the Nucleotide Transformer: each run of A/C/G/T between
    N's is cut into k-mers from its start, the leftover (< k) bases become single-base tokens,
    and every N is its own token.

    Ids: 0-4 the single bases A C G T N and 5-8 the specials, as in ``char`` (so base ids stay
    0..3), then the 4^k k-mers in base-4 order (first base most significant).
    """

    name = "kmer"
    pad_id, mask_id, bos_id, eos_id, n_id = CharTokenizer.special_ids()

    def __init__(self, config: KmerTokenizerConfig | None = None) -> None:
        self.k = (config or KmerTokenizerConfig()).k
        self.first = len(alphabet.VOCAB)  # id of the first k-mer
        kmers = ["".join(p) for p in _products(alphabet.BASES, self.k)]
        self.vocab: tuple[str, ...] = (*alphabet.VOCAB, *kmers)
        self._codes = CharTokenizer()._table  # byte -> 0..3 base, 4 N
        self._weights = 4 ** np.arange(self.k - 1, -1, -1, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def max_bases_per_token(self) -> int:
        return self.k

    @property
    def complement_ids(self) -> list[int]:
        """Each k-mer maps to its reverse complement, so reversing the token order after this
        permutation decodes to the reverse complement of the sequence."""
        out = list(alphabet.COMPLEMENT_IDS)
        index = np.arange(4**self.k)
        digits = (index[:, None] // self._weights) % 4  # [4^k, k]
        rc = ((3 - digits[:, ::-1]) * self._weights).sum(1)
        return out + (rc + self.first).tolist()

    @property
    def bases_per_token(self) -> np.ndarray:
        """[V] float: 1 for A C G T N, 0 for specials, k for k-mers."""
        out = np.zeros(self.vocab_size, dtype=np.float32)
        out[: alphabet.N + 1] = 1.0
        out[self.first :] = self.k
        return out

    def encode(self, seq: bytes | bytearray | str | np.ndarray) -> np.ndarray:
        """[T] int64 ids of a normalised sequence (vectorised: no loop over bases)."""
        if isinstance(seq, str):
            seq = seq.encode("ascii")
        raw = seq if isinstance(seq, np.ndarray) else np.frombuffer(seq, dtype=np.uint8)
        codes = self._codes[raw]
        n = len(codes)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        k = self.k
        is_n = codes == alphabet.N
        pos = np.arange(n)
        # start of the A/C/G/T run each position is in, and that run's end
        breaks = np.r_[np.flatnonzero(is_n), n]  # each N, and the end as a last break
        run_start = np.maximum.accumulate(np.where(np.r_[True, is_n[:-1]], pos, 0))
        run_end = breaks[np.searchsorted(breaks, pos, side="left")]
        offset = pos - run_start
        full = (run_end - run_start) // k * k  # bases of the run covered by whole k-mers
        in_kmer = ~is_n & (offset < full)
        starts = in_kmer & (offset % k == 0)
        single = ~is_n & ~in_kmer
        at = np.flatnonzero(starts)
        kmer_ids = np.zeros(len(at), dtype=np.int64)
        for j in range(k):  # base-4 digits, only where a k-mer starts
            kmer_ids = kmer_ids * 4 + codes[at + j]
        ids = codes.astype(np.int64)
        ids[at] = kmer_ids + self.first
        return ids[starts | single | is_n]

    def decode(self, ids: Any) -> str:
        """The bases of ``ids`` as a string; special tokens are dropped."""
        ids = np.asarray(ids).reshape(-1)
        specials = set(range(alphabet.N + 1, self.first))
        return "".join(self.vocab[i] for i in ids if i not in specials)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "options": {"k": self.k}, "vocab": list(self.vocab)}

    def save(self, directory: str | Path) -> Path:
        """Write nucleo_tokenizer.json and the Hugging Face files; the first one's path."""
        hf = hf_tokenizer.word_level(self.vocab, self.k)
        return hf_tokenizer.save(directory, self.to_json(), hf)


def _products(alphabet_: str, k: int) -> list[tuple[str, ...]]:
    import itertools

    return list(itertools.product(alphabet_, repeat=k))


@dataclass
class BpeTokenizerConfig:
    """path: a BPE trained by ``nucleo data bpe`` (its JSON file, or the folder that holds it
    as ``nucleo_tokenizer.json`` or ``tokenizer.json``). The vocabulary size is chosen when
    training (``--vocab-size``)."""

    path: str = ""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "give a trained BPE: train one with `nucleo data bpe`")


@TOKENIZERS.register("bpe", config=BpeTokenizerConfig)
class BpeTokenizer:
    """Byte-pair encoding learned on genomes with Hugging Face ``tokenizers`` (as DNABERT-2).

    Ids: 0-8 as in ``char`` (A C G T N and the specials; N is never merged), then the learned
    tokens in the order BPE learned them. A window of ``seq_len`` tokens needs a varying number
    of bases, so the loader cuts ``bases_for(seq_len)`` bases (the measured mean bases per
    token x 1.25, plus 16) and truncates the encoding to seq_len; windows that come out short
    are padded. There is no complement map (the complement of a learned token need not be
    one), so the ``rc`` loss and caduceus need ``char`` or ``kmer``; RC augmentation works.
    """

    name = "bpe"
    pad_id, mask_id, bos_id, eos_id, n_id = CharTokenizer.special_ids()
    complement_ids = None

    def __init__(self, config: BpeTokenizerConfig | None = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork
        from tokenizers import Tokenizer

        path = Path((config or BpeTokenizerConfig("?")).path)
        if path.is_dir():
            path = tokenizer_file(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.tokenizer_options.path: {path}: no trained BPE tokenizer there; "
                "train one with `nucleo data bpe --shards DIR --out FILE`"
            )
        spec = json.loads(path.read_text())
        if spec.get("type") != "bpe" or "hf" not in spec:
            raise ValueError(f"{path}: not a nucleo BPE tokenizer (type {spec.get('type')!r})")
        self.path = path
        self.spec = spec
        self._tk = Tokenizer.from_str(json.dumps(spec["hf"]))
        hf_vocab = self._tk.get_vocab()  # token -> HF id
        learned = [t for t, _ in sorted(hf_vocab.items(), key=lambda kv: kv[1])]
        learned = [t for t in learned if t not in alphabet.VOCAB]
        self.vocab: tuple[str, ...] = (*alphabet.VOCAB, *learned)
        index = {t: i for i, t in enumerate(self.vocab)}
        self._map = np.zeros(max(hf_vocab.values()) + 1, dtype=np.int64)
        for token, hf_id in hf_vocab.items():
            self._map[hf_id] = index[token]
        self.mean_bases_per_token = float(spec["stats"]["mean_bases_per_token"])
        self._normalise = bytes(CharTokenizer()._table.astype(np.uint8))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def max_bases_per_token(self) -> int:
        return max(len(t) for t in (*self.vocab[alphabet.N + 1 :], "A"))

    @property
    def bases_per_token(self) -> np.ndarray:
        """[V] float: the length of each token's bases (0 for specials)."""
        out = np.array([len(t) for t in self.vocab], dtype=np.float32)
        out[alphabet.N + 1 : len(alphabet.VOCAB)] = 0.0
        return out

    def bases_for(self, seq_len: int) -> int:
        """Bases to cut for a window of ``seq_len`` tokens (rarely short: then padded)."""
        return math.ceil(seq_len * self.mean_bases_per_token * 1.25) + 16

    def encode(self, seq: bytes | bytearray | str | np.ndarray) -> np.ndarray:
        """[T] int64 ids of a normalised sequence."""
        if isinstance(seq, np.ndarray):
            seq = seq.tobytes()
        if isinstance(seq, str):
            seq = seq.encode("ascii")
        # anything but A C G T becomes N, as in char (the BPE alphabet is ACGTN)
        text = bytes(seq).translate(self._normalise).translate(_ID_TO_BASE).decode("ascii")
        return self._map[np.asarray(self._tk.encode(text).ids, dtype=np.int64)]

    def decode(self, ids: Any) -> str:
        """The bases of ``ids`` as a string; special tokens are dropped."""
        ids = np.asarray(ids).reshape(-1)
        specials = set(range(alphabet.N + 1, len(alphabet.VOCAB)))
        return "".join(self.vocab[i] for i in ids if i not in specials)

    def to_json(self) -> dict[str, Any]:
        return {**self.spec, "vocab": list(self.vocab)}

    def save(self, directory: str | Path) -> Path:
        """Write nucleo_tokenizer.json and the Hugging Face files; the first one's path."""
        hf = hf_tokenizer.bpe(self.spec["hf"], self.vocab)
        return hf_tokenizer.save(directory, self.to_json(), hf)


_ID_TO_BASE = bytes.maketrans(bytes(range(5)), b"ACGTN")


def _training_text(
    shard_dir: str | Path, max_bases: int, piece_len: int, seed: int
) -> tuple[list[str], dict[str, int]]:
    """Pieces of ``piece_len`` bases from the training shards: each kingdom contributes up to
    max_bases / kingdoms (all it has when less), so small kingdoms are in the vocabulary."""
    import random

    from data_pipeline.loader import tar_samples
    from data_pipeline.shards import load_manifest, shard_paths

    manifest = load_manifest(shard_dir)
    kingdoms = sorted(manifest["kingdoms"])
    share = max_bases // max(1, len(kingdoms))
    pieces: list[str] = []
    used: dict[str, int] = {}
    for kingdom in kingdoms:
        shards = [p for p, _ in shard_paths(shard_dir, manifest, "train", [kingdom])]
        random.Random(f"{seed}:{kingdom}").shuffle(shards)
        used[kingdom] = 0
        for path in shards:
            for sample in tar_samples(path):
                seq = sample["seq"].upper().decode("ascii")
                for start in range(0, len(seq), piece_len):
                    piece = seq[start : start + piece_len]
                    pieces.append(piece)
                    used[kingdom] += len(piece)
                    if used[kingdom] >= share:
                        break
                if used[kingdom] >= share:
                    break
            if used[kingdom] >= share:
                break
    return pieces, used


def train_bpe(
    shard_dir: str | Path,
    out: str | Path,
    vocab_size: int = 4096,
    max_bases: int = 50_000_000,
    piece_len: int = 2000,
    seed: int = 0,
    log: Any = print,
) -> BpeTokenizer:
    """Learn a BPE vocabulary on the training split of ``shard_dir``; write it to ``out`` (a
    self-contained JSON file; a folder gets ``nucleo_tokenizer.json``) and return it.

    The text is split at N (N stays a single token) and into pieces of ``piece_len`` bases, so
    no token spans a gap or a window boundary it never sees in training. ``vocab_size`` counts
    the 9 ids of ``char`` too.
    """
    import time

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 16:
        raise ValueError(f"--vocab-size must be >= 16 (9 char ids + merges), got {vocab_size}")
    started = time.time()
    pieces, used = _training_text(shard_dir, max_bases, piece_len, seed)
    if not pieces:
        raise ValueError(f"{shard_dir}: no training bases to learn a BPE from")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("N"), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (len(alphabet.VOCAB) - 5),  # the specials are nucleo's own
        initial_alphabet=list("ACGTN"),
        min_frequency=2,
        show_progress=False,
    )
    tk.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    sample = "".join(pieces[:: max(1, len(pieces) // 200)])
    tokens = len(tk.encode(sample).ids)
    spec = {
        "type": "bpe",
        "hf": json.loads(tk.to_str()),
        "stats": {
            "mean_bases_per_token": round(len(sample) / max(1, tokens), 4),
            "trained_on": str(shard_dir),
            "training_bases": used,
            "piece_len": piece_len,
            "seconds": round(time.time() - started, 1),
        },
    }
    out = Path(out)
    if out.suffix != ".json":
        out = out / hf_tokenizer.NUCLEO_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec) + "\n")
    tmp.replace(out)
    tokenizer = BpeTokenizer(BpeTokenizerConfig(str(out)))
    log(
        f"BPE: {tokenizer.vocab_size} tokens from {sum(used.values()):,} bases in "
        f"{spec['stats']['seconds']} s; {spec['stats']['mean_bases_per_token']} bases per token; "
        f"wrote {out}"
    )
    return tokenizer


def build_tokenizer(name: str, options: dict[str, Any] | None = None) -> Any:
    """A tokenizer by registry name (``data.tokenizer``) and its settings
    (``data.tokenizer_options``, checked against the tokenizer's config)."""
    entry = TOKENIZERS.get(name)
    return entry.cls(from_dict(entry.config, options or {}, "data.tokenizer_options"))


def tokenizer_file(directory: Path) -> Path:
    """Where a folder keeps nucleo's tokenizer description: ``nucleo_tokenizer.json``, or in
    folders written before the Hugging Face twin existed, ``tokenizer.json``."""
    path = directory / hf_tokenizer.NUCLEO_FILE
    return path if path.is_file() else directory / hf_tokenizer.HF_FILE


def load_tokenizer(directory: str | Path) -> Any:
    """Load the tokenizer of an export, run or classifier folder (``nucleo_tokenizer.json``;
    an older folder's nucleo-format ``tokenizer.json``) and check its vocabulary."""
    path = tokenizer_file(Path(directory))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.with_name(hf_tokenizer.NUCLEO_FILE)}: not found; every export and run folder "
            "has one"
        )
    try:
        spec = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if hf_tokenizer.is_hf_spec(spec):
        raise ValueError(
            f"{path}: a Hugging Face tokenizer, and no {hf_tokenizer.NUCLEO_FILE} beside it; "
            "nucleo needs the nucleo_tokenizer.json its exports are written with"
        )
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{path}: no tokenizer 'type'; is it a nucleo tokenizer file?")
    options = {"path": str(path)} if spec.get("type") == "bpe" else spec.get("options")
    try:
        tokenizer = build_tokenizer(spec["type"], options)
    except (ValueError, KeyError) as err:  # an unknown type, or options it does not take
        raise ValueError(f"{path}: {err}") from None
    if list(spec.get("vocab", [])) != list(tokenizer.vocab):
        raise ValueError(f"{path}: vocabulary differs from this version's {spec['type']!r}")
    return tokenizer
