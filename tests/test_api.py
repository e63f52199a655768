"""The Python API (nucleo.load): the README's snippets run as written on a fresh export, and
every method gives the command line's numbers."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.tokenizers import CharTokenizer
from nucleo import api
from nucleo.downstream.classifier import SequenceClassifier, predict_file, save_classifier
from nucleo.downstream.inference import embed_file, score_file
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model
from tests.conftest import ROOT, sample_file

SEQS = ["ACGTTGCAACGGTACCGTTAGCATGCAAGCTTGGCA", "ggcaNNtRYk", "GGGCCCATATATCGCG"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple:
    tmp = tmp_path_factory.mktemp("api")
    cfg = load_config(arch="transformer", overrides=["model.d_model=16", "model.n_layers=2",
                                                     "model.n_heads=2"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, CharTokenizer())
    out = export_model(model.state_dict(), cfg, CharTokenizer(), tmp / "run" / "export")
    clf = save_classifier(
        SequenceClassifier(model, 16, 2), out,
        {"task": "t", "classes": ["no", "yes"], "rc_conjoin": True, "max_tokens": 24},
        tmp / "classifier",
    )  # fmt: skip
    fasta = tmp / "q.fa"
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(SEQS)))
    return out, clf, fasta


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of README.md's section ``heading`` (up to the next heading)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    section = re.split(r"\n#{2,4} ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_the_readme_python_api_runs_as_written(export):
    out, _clf, _fasta = export
    blocks = python_blocks("#### Python API")
    assert len(blocks) == 2
    for code in blocks:
        code = code.replace("runs/<name>/export", str(out))
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]


def test_the_methods_give_the_commands_numbers(export):
    out, clf, fasta = export
    lm = api.load(out.parent, "cpu")  # the run folder finds its export
    assert isinstance(lm, api.LanguageModel) and "causal transformer" in repr(lm)
    cli = list(score_file(out, fasta, window=16, batch=2, device="cpu", stride=4))
    got = lm.score(fasta, window=16, stride=4)
    assert [s.record for s in got] == ["r0", "r1", "r2"]
    for a, b in zip(got, cli, strict=True):
        assert a.log_likelihood == pytest.approx(b.log_likelihood, rel=1e-6)
        assert a.tokens_scored == b.tokens_scored
    from_strings = lm.score(SEQS, window=16, stride=4)
    assert [s.log_likelihood for s in from_strings] == pytest.approx(
        [s.log_likelihood for s in cli], rel=1e-6
    )
    _ids, vectors = embed_file(out, fasta, 16, 2, "cpu", "mean", None, 1)
    np.testing.assert_allclose(lm.embed(SEQS, layer=1, window=16), vectors, atol=1e-6)
    streamed = lm.embed(fasta, layer=1, window=16, stream=True)
    assert not isinstance(streamed, list)
    np.testing.assert_allclose(np.stack(list(streamed)), vectors, atol=1e-6)
    assert lm.embed([]).shape == (0, 16)

    greedy = lm.generate(["ACGTAC"], num=2, length=12, temperature=0)
    assert len(greedy) == 2 and all(len(g) >= 12 and set(g) <= set("ACGT") for g in greedy)
    mixed = lm.generate(["ACGTAC", "GGA"], num=2, length=8, temperature=0)
    assert len(mixed) == 4 and mixed[0] == mixed[1] and mixed[2] == mixed[3]
    assert mixed[0] == lm.generate(["ACGTAC"], length=8, temperature=0)[0]
    assert mixed[2] == lm.generate(["GGA"], length=8, temperature=0)[0]
    assert len(lm.generate(num=3, length=5, seed=1)) == 3  # from nothing

    classifier = api.load(clf, "cpu")
    assert isinstance(classifier, api.Classifier) and classifier.classes == ["no", "yes"]
    rows = list(predict_file(clf, fasta, batch=2, device="cpu"))
    preds = classifier.predict(fasta, batch_size=2)
    for p, (rid, label, probs) in zip(preds, rows, strict=True):
        assert (p.record, p.label) == (rid, label)
        assert list(p.probabilities.values()) == pytest.approx(list(probs), abs=1e-9)


def test_score_variants_gives_the_commands_scores(export, tmp_path):
    from nucleo.downstream.variants import score_vcf

    out, _clf, _fasta = export
    genome = "".join(SEQS[0] for _ in range(4))  # 144 bases
    (tmp_path / "ref.fa").write_text(f">chr1\n{genome}\n")
    lines = [f"chr1\t{p}\t.\t{genome[p - 1]}\t{'A' if genome[p - 1] != 'A' else 'C'}\t.\t.\t."
             for p in (40, 77, 100)]  # fmt: skip
    (tmp_path / "v.vcf").write_text("##fileformat=VCFv4.2\n" + "\n".join(lines) + "\n")
    cli, _counts, _meta = score_vcf(out, tmp_path / "v.vcf", tmp_path / "ref.fa", window=64,
                                    device="cpu")  # fmt: skip
    got = api.load(out).score_variants(tmp_path / "v.vcf", tmp_path / "ref.fa", window=64)
    assert [g.score for g in got] == pytest.approx([c.score for c in cli], rel=1e-6)
    assert len(got) == 3 and all(np.isfinite(g.score) for g in got)


def test_mistakes_are_named(export, tmp_path):
    out, _clf, _fasta = export
    lm = api.load(out)
    with pytest.raises(ValueError, match=r"sequence 1: '@' at 2 is not a base"):
        lm.score(["ACGT", "AC@T"])
    with pytest.raises(ValueError, match="stride"):
        lm.score(["ACGT"], window=8, stride=9)
    with pytest.raises(FileNotFoundError, match="not a nucleo export"):
        api.load(tmp_path)
    (tmp_path / "config.yaml").write_text("arch: transformer\n")
    with pytest.raises(FileNotFoundError, match="nucleo export"):
        api.load(tmp_path)


def test_import_nucleo_stays_light_and_load_is_there():
    code = "import sys, nucleo; assert 'torch' not in sys.modules; print(callable(nucleo.load))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert sample_file("viral/lambda.fasta.gz").is_file()  # the README snippet's genome
