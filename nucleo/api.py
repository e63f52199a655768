"""nucleo from Python: ``nucleo.load(path)`` and what a loaded model can do.

    import nucleo

    lm = nucleo.load("runs/demo")                 # a run folder, an export, or a classifier
    lm.score(["ACGTTGCA...", "GGCAT..."])         # [Score(bits_per_base=...), ...]
    lm.embed("genomes.fa", layer=-2)              # [records, d_model] float32
    lm.generate(["ATGAAA"], length=200, temperature=0)          # ["...", ...]
    lm.score_variants("calls.vcf.gz", "genome.fa")              # [VariantScore, ...]
    lm.evaluate_regions("data/offline/shards").save("regions.md")  # bits by region class
    clf = nucleo.load("runs/finetune/kingdom-...-seed0")
    clf.predict(["ACGT..."])                      # [Prediction(label, probabilities), ...]

Each method takes sequences (str or bytes, read as the genome readers read them: any case,
IUPAC codes as N) or the path of a FASTA/GenBank file (compressed too), streamed record by
record; ``stream=True`` returns an iterator instead of a list, so a genome never sits in memory
whole. They run the functions the command line runs (``nucleo.downstream.inference``,
``classifier``, ``generate``, ``variants``), so the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.readers import VALID_BASES, normalise_bases, read_sequences
from nucleo.core.device import resolve as resolve_device
from nucleo.downstream import classifier as clf
from nucleo.downstream import inference
from nucleo.downstream.inference import Score

Sequences = str | bytes | Path | Iterable[str | bytes]


def records(sequences: Sequences) -> Iterator[tuple[str, bytes]]:
    """(id, upper-case ACGTN bytes) of each input: a FASTA/GenBank path (ids from the file),
    one sequence, or an iterable of them (ids "0", "1", ...). A character that is not a base
    raises ValueError naming the sequence and position."""
    if isinstance(sequences, Path) or (
        isinstance(sequences, str) and Path(sequences).suffix and Path(sequences).is_file()
    ):
        for record in read_sequences(sequences):
            yield record.id, bytes(record.seq)
        return
    items = [sequences] if isinstance(sequences, str | bytes) else sequences
    for i, item in enumerate(items):
        text = item.decode("ascii", errors="replace") if isinstance(item, bytes) else item
        if not isinstance(text, str):
            raise TypeError(f"sequence {i}: expected str or bytes, got {type(item).__name__}")
        clean, bad = normalise_bases(text)
        if bad >= 0:
            raise ValueError(f"sequence {i}: {text[bad]!r} at {bad} is not a base; valid: "
                             f"{VALID_BASES}")  # fmt: skip
        yield str(i), clean


def _result(items: Iterator[Any], stream: bool) -> Any:
    return items if stream else list(items)


@dataclass
class Prediction:
    """A classifier's answer for one sequence: the class and every class's probability."""

    record: str
    label: str
    probabilities: dict[str, float]


class LanguageModel:
    """A loaded export: ``score``, ``embed``, ``generate``, ``score_variants``.

    ``model``, ``tokenizer`` and ``config`` (config.json) are the export's, for anything else.
    """

    def __init__(self, path: Path, device: str = "auto") -> None:
        from nucleo.train.export import load_exported

        self.path = path
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.config = load_exported(path, self.device)
        self.causal = bool(self.config.get("causal", True))

    def __repr__(self) -> str:
        kind = "causal" if self.causal else "bidirectional"
        return f"<nucleo {kind} {self.config['arch']} language model from {self.path}>"

    def score(
        self,
        sequences: Sequences,
        window: int = 1024,
        stride: int | None = None,
        both_strands: bool = False,
        batch_size: int = 8,
        stream: bool = False,
    ) -> list[Score] | Iterator[Score]:
        """A Score (log-likelihood in nats, bits per base) per sequence, as ``nucleo score``
        gives: windows of ``window`` tokens every ``stride`` (each token scored once)."""
        if not self.causal:
            raise ValueError(f"{self.path}: a bidirectional model has no left-to-right "
                             "likelihood; score needs a causal model")  # fmt: skip
        inference.windows(0, window, stride)  # checks before anything is read
        model, tok, dev, batch = self.model, self.tokenizer, self.device, batch_size
        scores = (
            inference.score_sequence(model, tok, i, s, window, batch, dev, stride, both_strands)
            for i, s in records(sequences)
        )
        return _result(scores, stream)

    def embed(
        self,
        sequences: Sequences,
        layer: int = -1,
        pooling: str = "mean",
        window: int = 1024,
        stride: int | None = None,
        batch_size: int = 8,
        stream: bool = False,
    ) -> np.ndarray | Iterator[np.ndarray]:
        """[n, D] float32 pooled hidden states of ``layer`` (0 the embedding, -1 the final
        states), as ``nucleo embed`` gives; ``stream``: one [D] array per sequence."""
        inference.windows(0, window, stride)

        def run() -> Iterator[np.ndarray]:
            for _, seq in records(sequences):
                yield inference.embed_sequence(
                    self.model, self.tokenizer, seq, window, batch_size, self.device, pooling,
                    stride, layer,
                )  # fmt: skip

        if stream:
            return run()
        rows = list(run())
        width = int(self.model.embed.embedding_dim) if not rows else len(rows[0])
        return np.stack(rows) if rows else np.zeros((0, width), np.float32)

    def generate(
        self,
        prompts: Sequences | None = None,
        num: int = 1,
        length: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        window: int = 1024,
    ) -> list[str]:
        """Sampled continuations (new bases only), as ``nucleo generate`` samples: ``num`` per
        prompt, all in one batch (prompts of any lengths; each continues as it would alone),
        or ``num`` from nothing. ``temperature`` 0 is greedy."""
        from nucleo.downstream.generate import sample

        starts = [seq for _, seq in records(prompts)] if prompts is not None else [b""]
        batch = [start for start in starts for _ in range(num)]
        seqs = sample(self.model, self.tokenizer, len(batch), length, batch, temperature, top_k,
                      top_p, seed, window, self.device)  # fmt: skip
        return [s.decode() for s in seqs]

    def score_variants(
        self,
        vcf: str | Path,
        reference: str | Path,
        window: int = 1024,
        strands: str = "both",
        batch_size: int = 8,
        skip_mismatches: bool = False,
        stream: bool = False,
    ) -> Any:
        """A VariantScore per ALT allele of ``vcf`` against ``reference`` (FASTA), as
        ``nucleo score-variants`` gives (nucleo.downstream.variants)."""
        from data_pipeline.vcf import read_variants
        from nucleo.downstream.variants import Reference, score_variants

        scores = score_variants(
            self.model, self.tokenizer, read_variants(vcf), Reference(reference), window,
            strands, batch_size, skip_mismatches=skip_mismatches,
        )  # fmt: skip
        return _result(scores, stream)

    def evaluate_regions(
        self,
        shards: str | Path | None = None,
        annotations: Sequence[str | Path] = (),
        kingdom: str = "unspecified",
        split: str = "val",
        window: int | None = None,
        stride: int | None = None,
        max_bases_per_kingdom: int = 100_000,
        batch_size: int = 8,
        floor: tuple[Any, int, str] | None = None,
        log: Callable[[str], None] = print,
    ) -> Any:
        """Bits per base by region class, repeat flag and kingdom, as ``nucleo evaluate``
        computes them (nucleo.downstream.regions), of the ``split`` records of ``shards`` or of
        ``annotations`` files (of one ``kingdom``); ``floor``: (model with ``nats(seq, order)``,
        order, name), e.g. a data_pipeline.markov model. A ``regions.Report``: ``.to_dict()``
        (every number), ``.markdown()``, ``.save("x.md")`` (also writes x.json and x.png)."""
        from nucleo.downstream import regions
        from nucleo.downstream.region_classes import targets_from_files, targets_from_shards

        net = regions.as_network(self.path, self.model, self.tokenizer, self.config, window,
                                 stride)  # fmt: skip
        if annotations:
            targets = targets_from_files(annotations, kingdom)
        else:
            targets = targets_from_shards(shards or "data/offline/shards", split, log)
        return regions.evaluate([net], targets, self.device, max_bases_per_kingdom, batch_size,
                                floor, log=log)  # fmt: skip


class Classifier:
    """A loaded ``nucleo finetune`` output: ``predict``."""

    def __init__(self, path: Path, device: str = "auto") -> None:
        self.path = path
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.info = clf.load_classifier(path, self.device)
        self.classes: list[str] = list(self.info["classes"])

    def __repr__(self) -> str:
        return f"<nucleo classifier of {', '.join(self.classes)} from {self.path}>"

    def predict(
        self,
        sequences: Sequences,
        stride: int | None = None,
        batch_size: int = 64,
        stream: bool = False,
    ) -> list[Prediction] | Iterator[Prediction]:
        """A Prediction per sequence, as ``nucleo predict`` gives (whole sequences: windows of
        the fine-tuning length, every ``stride`` tokens, mean of their probabilities)."""

        def run() -> Iterator[Prediction]:
            pending: list[tuple[str, bytes]] = []

            def flush() -> Iterator[Prediction]:
                seqs = [seq for _, seq in pending]
                probs = clf.classify(self.model, self.tokenizer, self.info, seqs, batch_size,
                                     self.device, stride)  # fmt: skip
                for (rid, _), p in zip(pending, probs, strict=True):
                    shares = dict(zip(self.classes, map(float, p), strict=True))
                    yield Prediction(rid, self.classes[int(np.argmax(p))], shares)

            for item in records(sequences):
                pending.append(item)
                if len(pending) == batch_size:
                    yield from flush()
                    pending.clear()
            if pending:
                yield from flush()

        return _result(run(), stream)


def load(path: str | Path, device: str = "auto") -> LanguageModel | Classifier:
    """The model in ``path``: a classifier folder (classifier.json), an export (config.json),
    or a run folder (its ``export/``). ``device``: auto, cpu, cuda, cuda:N."""
    root = Path(path)
    if (root / "classifier.json").is_file():
        return Classifier(root, device)
    if (root / "config.json").is_file():
        return LanguageModel(root, device)
    if (root / "export" / "config.json").is_file():
        return LanguageModel(root / "export", device)
    if (root / "config.yaml").is_file():
        raise FileNotFoundError(f"{root}: a run folder without an export; make one with "
                                f"`nucleo export {root}`")  # fmt: skip
    raise FileNotFoundError(
        f"{root}: not a nucleo export (config.json), run folder (export/) or classifier "
        "(classifier.json)"
    )


__all__ = ["Classifier", "LanguageModel", "Prediction", "Score", "load", "records"]
