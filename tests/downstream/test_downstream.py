"""Downstream: annotations, built tasks and their splits, task layouts, fine-tuning and probes,
predict, generate and evaluate-generation, on the bundled real genome sample."""

from __future__ import annotations

import gzip
import json
import lzma
import os

import numpy as np
import pytest
import torch

from data_pipeline.annotations import (
    Feature,
    coverage,
    parse_location,
    read_genbank_features,
    read_gff3,
)
from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.classifier import metrics
from nucleo.downstream.finetune import fit_probe
from nucleo.downstream.generate import compare_sets, filter_logits, sample
from nucleo.downstream.tasks import (
    Split,
    Task,
    TaskError,
    build_coding_vs_intergenic,
    build_kingdom,
    build_plasmid_vs_chromosome,
    load_task,
    save_task,
)
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model
from tests.conftest import sample_file

GENBANK = [
    sample_file("plasmid/NC_005816.gb.gz"),  # Yersinia pestis plasmid
    sample_file("plastid/NC_000932.gb.gz"),  # Arabidopsis thaliana plastid
    sample_file("viral/NC_001422.gbk.gz"),  # phiX174
    sample_file("plasmid/NC_013363.gbk"),  # Escherichia coli plasmid
    sample_file("plasmid/NC_007717.gbk.gz"),  # Aster yellows phytoplasma
    sample_file("plasmid/NC_007719.gbk.gz"),  # Aster yellows phytoplasma, another replicon
]


# ----------------------------------------------------------------------------- annotations


def test_genbank_locations_become_zero_based_half_open_parts():
    assert parse_location("10..20") == [(9, 20, "+")]
    assert parse_location("complement(<1..>200)") == [(0, 200, "-")]
    assert parse_location("join(1..10,20..30)") == [(0, 10, "+"), (19, 30, "+")]
    assert parse_location("complement(join(5..8,J00194.1:1..9,12^13))") == [(4, 8, "-")]
    assert parse_location("42") == [(41, 42, "+")]
    with pytest.raises(ValueError, match="cannot read location part"):
        parse_location("1..x", "f.gb, line 3")


def test_genbank_features_match_the_records_and_their_translations():
    features = read_genbank_features(GENBANK[0])
    (record,) = read_sequences(GENBANK[0])
    cds = [f for f in features[record.id] if f.type == "CDS"]
    assert len(cds) >= 5 and all(0 <= f.start < f.end <= len(record) for f in cds)
    # a coding segment is a whole number of codons that starts with a start codon
    first = cds[0]
    seq = bytes(record.seq[first.start : first.end])
    seq = reverse_complement_bytes(seq) if first.strand == "-" else seq
    assert len(seq) % 3 == 0 and seq[:3] in (b"ATG", b"GTG", b"TTG")


def test_gff3_is_read_with_its_errors_named(tmp_path):
    path = tmp_path / "x.gff3"
    path.write_text(
        "##gff-version 3\nchr1\tsrc\tregion\t1\t1000\t.\t+\t.\tID=r\n"
        "chr1\tsrc\tCDS\t101\t400\t.\t-\t0\tID=c\n"
    )
    feats = read_gff3(path)["chr1"]
    assert feats[1] == Feature("CDS", 100, 400, "-")
    cov = coverage(feats, 1000)
    assert cov[99] == 0 and cov[100] == 1 and cov[399] == 1 and cov[400] == 0  # region ignored
    path.write_text("chr1\tsrc\tCDS\t1\tten\t.\t+\t0\tID=c\n")
    with pytest.raises(ValueError, match=r"x.gff3:1: start/end must be integers"):
        read_gff3(path)


# ----------------------------------------------------------------------------- built tasks


def test_kingdom_task_is_balanced_and_its_test_records_are_held_out(sample_shards):
    task = build_kingdom(sample_shards, length=100, train_per_class=20, test_per_class=10)
    assert "vertebrate_other" not in task.classes  # no val split in the sample
    train, test = task.splits["train"], task.splits["test"]
    assert train.counts(len(task.classes)) == [20] * len(task.classes)
    assert test.counts(len(task.classes)) == [10] * len(task.classes)
    assert not set(train.groups) & set(test.groups)  # records never on both sides
    assert all(len(s) == 100 and b"N" not in s for s in train.sequences + test.sequences)
    again = build_kingdom(sample_shards, length=100, train_per_class=20, test_per_class=10)
    assert again.splits["test"].sequences == test.sequences  # deterministic by seed


def _genome(path, chromosome: bytes, plasmid: bytes, name: str) -> None:
    with lzma.open(path, "wt") as fh:
        fh.write(f">{name}_chr {name} chromosome, complete genome\n{chromosome.decode()}\n")
        fh.write(f">{name}_p1 {name} plasmid p1, complete sequence\n{plasmid.decode()}\n")


def test_plasmid_task_holds_one_genome_out(tmp_path):
    (kleb,) = read_sequences(sample_file("bacteria/Klebs_Kp1084.fna.xz"))
    (deino,) = read_sequences(sample_file("plasmid/deinococcus_MP1.fna.gz"))
    shigella = list(read_sequences(sample_file("plasmid/shigella_sonnei_plasmids.fasta.xz")))
    _genome(tmp_path / "A.fna.xz", bytes(kleb.seq[:200_000]), bytes(shigella[0].seq), "A")
    _genome(tmp_path / "B.fna.xz", bytes(kleb.seq[-200_000:]), bytes(deino.seq), "B")
    (tmp_path / "C.fna").write_text(f">C chromosome only\n{bytes(kleb.seq[:5000]).decode()}\n")
    task = build_plasmid_vs_chromosome(
        [tmp_path / "A.fna.xz", tmp_path / "B.fna.xz", tmp_path / "C.fna"],
        test_genome="B",
        train_per_class=50,
        test_per_class=30,
    )
    assert set(task.splits["train"].groups) == {"A"} and set(task.splits["test"].groups) == {"B"}
    assert str(tmp_path / "C.fna") in task.meta["skipped"]
    for split in task.splits.values():
        counts = split.counts(2)
        assert min(counts) >= 0.8 * max(counts)
    with pytest.raises(TaskError, match="needs >= 2 genome files"):
        build_plasmid_vs_chromosome([tmp_path / "A.fna.xz", tmp_path / "C.fna"])


def test_coding_windows_lie_inside_cds_and_intergenic_ones_touch_no_feature():
    task = build_coding_vs_intergenic(
        GENBANK, length=60, train_per_class=40, test_per_class=20, test_groups=["Aster_yellows"]
    )
    assert task.classes == ["coding", "intergenic"]
    assert set(task.splits["test"].groups) == {"Aster_yellows"}
    assert "Aster_yellows" not in task.splits["train"].groups
    feats = {}
    for path in GENBANK:
        feats.update(read_genbank_features(path))
    seqs = {r.id: bytes(r.seq) for p in GENBANK for r in read_sequences(p)}
    for split in task.splits.values():
        assert split.regions is not None
        for seq, label, (rid, start, end, strand) in zip(
            split.sequences, split.labels, split.regions, strict=True
        ):
            n = len(seqs[rid])
            if label == 0:
                cds = coverage([f for f in feats[rid] if f.strand == strand], n, ["CDS"])
                assert cds[start:end].min() > 0
            else:
                assert coverage(feats[rid], n)[start:end].max() == 0
            expected = seqs[rid][start:end]
            assert seq == (reverse_complement_bytes(expected) if strand == "-" else expected)


# ----------------------------------------------------------------------------- layouts


def _small_task() -> Task:
    rng = np.random.default_rng(0)
    seqs = [bytes(rng.choice(list(b"ACGT"), size=30).astype(np.uint8)) for _ in range(12)]
    labels = np.array([0, 1, 2] * 4)
    split = Split(seqs[:9], labels[:9], [f"s{i}" for i in range(9)], ["g"] * 9)
    test = Split(seqs[9:], labels[9:], ["t0", "t1", "t2"], ["h"] * 3)
    return Task("toy", ["a", "b", "c"], {"train": split, "test": test})


@pytest.mark.parametrize("layout", ["parquet", "genomic-benchmarks", "genomic-benchmarks-cached"])
def test_each_layout_round_trips(tmp_path, layout):
    task = _small_task()
    save_task(task, tmp_path / layout, layout)
    back = load_task(tmp_path / layout)
    assert back.classes == task.classes
    for name, split in task.splits.items():
        got = back.splits[name]
        assert sorted(zip(got.sequences, got.labels.tolist(), strict=True)) == sorted(
            zip(split.sequences, split.labels.tolist(), strict=True)
        )


def test_genomic_benchmarks_intervals_read_minus_strand_and_name_bad_rows(tmp_path):
    root = tmp_path / "gb"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    ref = tmp_path / "ref.fa.gz"
    with gzip.open(ref, "wt") as fh:
        fh.write(">chrA\nAACCGGTTACGT\n")
    (root / "metadata.yaml").write_text(
        f"version: 0\nclasses:\n  neg: {{type: fa.gz, url: '{ref}'}}\n"
        f"  pos: {{type: fa.gz, url: '{ref}'}}\n"
    )
    rows = {"pos": "0,chrA,0,4,-", "neg": "1,chrA,4,8,+"}
    for split in ("train", "test"):
        for cls, row in rows.items():
            with gzip.open(root / split / f"{cls}.csv.gz", "wt") as fh:
                fh.write(f"id,region,start,end,strand\n{row}\n")
    task = load_task(root)
    assert task.classes == ["neg", "pos"]
    pos = task.splits["train"].sequences[task.splits["train"].labels.tolist().index(1)]
    assert pos == b"GGTT"  # reverse complement of AACC
    with gzip.open(root / "test" / "pos.csv.gz", "wt") as fh:
        fh.write("id,region,start,end,strand\n0,chrZ,0,4,+\n")
    with pytest.raises(TaskError, match=r"pos.csv.gz, line 2: region 'chrZ'"):
        load_task(root)


@pytest.fixture
def file_server(tmp_path):
    """(folder, base URL): a loopback HTTP server of the files put in ``folder``."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "served"
    served.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_genomic_benchmarks_reference_is_downloaded_once_from_its_url(tmp_path, file_server):
    served, base = file_server
    with gzip.open(served / "genome.fa.gz", "wt") as fh:
        fh.write(">1\nAACCGGTTACGTACGT\n>2\nGGGGCCCC\n")
    url = f"{base}/genome.fa.gz"
    root = tmp_path / "human_toy"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for cls, row in {"positive": "0,chr1,0,4,+", "negative": "0,chr2,0,4,+"}.items():
            with gzip.open(root / split / f"{cls}.csv.gz", "wt") as fh:
                fh.write(f"id,region,start,end,strand\n{row}\n")
    spec = f"{{type: fa.gz, url: '{url}', extra_processing: ENSEMBL_HUMAN_GENOME}}"
    (root / "metadata.yaml").write_text(
        f"version: 0\nclasses:\n  positive: {spec}\n  negative: {spec}\n"
    )
    refs = tmp_path / "refs"
    task = load_task(root, references=refs)  # region names get Ensembl's "chr" prefix
    assert (refs / "genome.fa.gz").is_file()
    train = dict(
        zip(task.splits["train"].labels.tolist(), task.splits["train"].sequences, strict=True)
    )
    assert train == {
        task.classes.index("positive"): b"AACC",
        task.classes.index("negative"): b"GGGG",
    }
    (served / "genome.fa.gz").unlink()  # no longer served: the kept copy is used
    assert load_task(root, references=refs).classes == ["negative", "positive"]


def test_a_corrupt_reference_download_is_refused_and_not_kept(tmp_path, file_server):
    served, base = file_server
    whole = gzip.compress(b">1\nAACCGGTTACGTACGT\n" * 200)
    (served / "genome.fa.gz").write_bytes(whole[: len(whole) // 2])  # truncated upstream
    url = f"{base}/genome.fa.gz"
    root = tmp_path / "toy"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        with gzip.open(root / split / "positive.csv.gz", "wt") as fh:
            fh.write("id,region,start,end,strand\n0,1,0,4,+\n")
    (root / "metadata.yaml").write_text(
        f"version: 0\nclasses:\n  positive: {{type: fa.gz, url: '{url}'}}\n"
    )
    refs = tmp_path / "refs"
    with pytest.raises(TaskError, match="corrupt or truncated gzip"):
        load_task(root, references=refs)
    assert not list(refs.iterdir())  # nothing half-downloaded is kept


def test_nucleotide_transformer_parquet_and_bad_sequences(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        table = pa.table({"sequence": ["ACGTN", "ttgca"], "name": ["x", "y"], "label": [1, 0]})
        pq.write_table(table, tmp_path / f"{split}-00000-of-00001.parquet")
    task = load_task(tmp_path)
    assert task.classes == ["0", "1"] and task.splits["test"].sequences[1] == b"TTGCA"
    pq.write_table(
        pa.table({"sequence": ["AC#T"], "label": [0]}), tmp_path / "test-00000-of-00001.parquet"
    )
    with pytest.raises(TaskError, match=r"row 0: characters '#' are not DNA"):
        load_task(tmp_path)


# ----------------------------------------------------------------------------- fine-tuning


def _export(tmp_path):
    cfg = load_config(
        arch="transformer", overrides=["model.d_model=32", "model.n_layers=1", "model.n_heads=2"]
    )
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, tokenizer)
    return export_model(model.state_dict(), cfg, tokenizer, tmp_path / "export")


def _gc_task(tmp_path):
    """Real 80-base windows: yeast chromosome I (GC 0.39) against the Deinococcus radiodurans
    plasmid MP1 (GC about 0.66)."""
    (yeast,) = read_sequences(sample_file("fungi/ScerR64_I.fna.gz"))
    (deino,) = read_sequences(sample_file("plasmid/deinococcus_MP1.fna.gz"))
    rows = []
    for label, rec in enumerate((yeast, deino)):
        seq = bytes(rec.seq)
        for i in range(80):
            rows.append((seq[i * 1000 : i * 1000 + 80], label))
    train = [r for i, r in enumerate(rows) if i % 80 < 60]
    test = [r for i, r in enumerate(rows) if i % 80 >= 60]

    def split(part, tag):
        return Split(
            [s for s, _ in part],
            np.array([y for _, y in part]),
            [f"{tag}{i}" for i in range(len(part))],
            [f"{tag}{i}" for i in range(len(part))],
        )

    task = Task(
        "gc", ["yeast", "deinococcus"], {"train": split(train, "a"), "test": split(test, "b")}
    )
    return save_task(task, tmp_path / "gc")


def test_finetune_learns_a_real_task_and_predict_reads_the_saved_classifier(tmp_path, capsys):
    export, task = _export(tmp_path), _gc_task(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "finetune", str(task), "--export", str(export), "--epochs", "4", "--lr", "3e-3",
        "--batch-size", "16", "--seeds", "0", "--out", str(tmp_path / "ft"),
        "--tracking-uri", store, "--rc-conjoin", "--register-as", "gc",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy >= 0.85, out  # GC content alone separates these two genomes
    (saved,) = (tmp_path / "ft").iterdir()
    fasta = tmp_path / "q.fa"
    loaded = load_task(task)
    test = loaded.splits["test"]
    fasta.write_text(
        "".join(f">{i}\n{s.decode()}\n" for i, s in zip(test.ids, test.sequences, strict=True))
    )
    tsv = tmp_path / "pred.tsv"
    assert main(["predict", str(saved), str(fasta), "--out", str(tsv), "--batch-size", "7"]) == 0
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["record", "prediction", "p_yeast", "p_deinococcus"]
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(test)
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    predicted = np.array([loaded.classes.index(r[1]) for r in rows])
    assert (predicted == probs.argmax(1)).all()
    assert (predicted == test.labels).mean() == pytest.approx(accuracy, abs=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)  # not mlflow.set_tracking_uri: it leaks to $ENV
    experiment = client.get_experiment_by_name("nucleo-finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["test/accuracy"] == pytest.approx(accuracy)
    tags = run.data.tags  # MLflow's own source tags, from the one tracking seam
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] and tags["nucleo.version"]
    assert tags["mlflow.source.name"]
    # the classifier is the run's MLflow model (tests/downstream/test_pyfunc.py loads one)
    (output,) = run.outputs.model_outputs
    version = client.get_model_version("gc", "1")
    assert version.run_id == run.info.run_id
    assert version.source == client.get_logged_model(output.model_id).artifact_location
    assert f"MLflow model runs:/{run.info.run_id}/model, registered as models:/gc/1" in out


def test_finetune_runs_through_the_engine_in_bf16_under_zero_2(tmp_path, capsys):
    """Fine-tuning is pretraining's engine: DeepSpeed bf16 weights with fp32 masters, ZeRO-2;
    the saved classifier holds the gathered fp32 weights and predicts."""
    export, task = _export(tmp_path), _gc_task(tmp_path)
    args = [
        "finetune", str(task), "--export", str(export), "--epochs", "2", "--lr", "3e-3",
        "--batch-size", "16", "--out", str(tmp_path / "ft"), "--precision", "bf16",
        "--zero-stage", "2", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert float(out.split("test accuracy ")[1].split()[0]) >= 0.7, out
    (saved,) = (tmp_path / "ft").iterdir()
    assert json.loads((saved / "classifier.json").read_text())["precision"] == "bf16"
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(saved / "head.safetensors")).values()} == {torch.float32}
    fasta = tmp_path / "q.fa"
    fasta.write_text(">a\nACGTACGTGGCCGGCCGCGC\n")
    assert main(["predict", str(saved), str(fasta)]) == 0


def test_compare_writes_the_table_and_resumes(tmp_path, capsys):
    export, task = _export(tmp_path), _gc_task(tmp_path)
    table = tmp_path / "cmp.md"
    args = [
        "finetune", str(task), "--export", f"rand={export}", "--compare", "--seeds", "0,1",
        "--epochs", "1", "--table", str(table), "--out", str(tmp_path / "ft"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    before = os.environ.get("MLFLOW_TRACKING_URI")
    assert main(args) == 0
    # MLflow exports its tracking URI to child processes; finetune must put it back
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    lines = table.read_text().splitlines()
    assert len(lines) == 2 + 4  # rand full, rand probe, scratch full, scratch probe
    assert "| gc | rand | pretrained | full | 2 |" in table.read_text()
    record = json.loads(table.with_suffix(".json").read_text())
    assert len(record["rows"][0]["per_seed"]) == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("nucleo-finetune")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("nucleo.kind") == "finetune-compare"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8 and all(r.info.status == "FINISHED" for r in runs)
    capsys.readouterr()
    assert main(args) == 0  # everything is in the table already: nothing reruns
    assert capsys.readouterr().out.count("already, kept") == 4


def test_a_probe_folded_into_the_head_gives_the_logistic_regressions_probabilities():
    from sklearn.linear_model import LogisticRegression

    from nucleo.downstream.finetune import FinetuneConfig

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 6)) * [1, 5, 0.1, 2, 3, 1] + [0, 3, 1, 0, -2, 0]
    y = np.repeat([0, 1, 2], 30)
    x[y == 1, 0] += 2
    cfg = FinetuneConfig(task="t", export="e", mode="probe")
    weight, bias = fit_probe(x, y, 3, cfg, seed=0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    ref = LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced", random_state=0)
    ref.fit((x - mean) / std, y)
    ours = torch.softmax(torch.from_numpy(x @ weight.T.astype(np.float64) + bias), -1).numpy()
    assert np.allclose(ours, ref.predict_proba((x - mean) / std), atol=1e-4)


def test_metrics_agree_with_their_definitions():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = metrics(labels, probs)
    assert m["accuracy"] == 0.75 and m["auroc"] == 1.0
    assert m["mcc"] == pytest.approx(1 / np.sqrt(3))  # tp 2, tn 1, fp 1, fn 0


# ----------------------------------------------------------------------------- generation


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (filter_logits(logits, 1.0, 2, 1.0)[0] > 0).tolist() == [True, True, False, False]
    assert (filter_logits(logits, 1.0, 0, 0.7)[0] > 0).tolist() == [True, True, False, False]
    assert (filter_logits(logits, 1.0, 0, 0.9)[0] > 0).tolist() == [True, True, True, False]
    cold = filter_logits(logits, 0.01, 0, 1.0)[0]
    assert cold[0] > 0.999
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, 0.0, 0, 1.0)


def test_sampling_continues_each_prompt_with_bases_only(tmp_path):
    from nucleo.train.export import load_exported

    model, tok, _ = load_exported(_export(tmp_path))
    out = sample(model, tok, 3, 25, [b"ACGTA", b"TTTTT", b"GGGCC"], top_k=3, seed=1)
    assert len(out) == 3 and all(len(s) == 25 and set(s) <= set(b"ACGT") for s in out)
    assert out == sample(model, tok, 3, 25, [b"ACGTA", b"TTTTT", b"GGGCC"], top_k=3, seed=1)
    assert len(sample(model, tok, 2, 10)[0]) == 10  # no prompt


def test_generate_and_evaluate_generation_commands(tmp_path, capsys):
    export = _export(tmp_path)
    fasta = tmp_path / "gen.fa"
    assert main(["generate", str(export), "--out", str(fasta), "--num", "6", "--length", "120",
                 "--prompt", "ACGT", "--batch-size", "4", "--top-p", "0.9"]) == 0  # fmt: skip
    generated = list(read_sequences(fasta))
    assert len(generated) == 6 and all(len(r) == 120 for r in generated)
    real = sample_file("viral/lambda.fasta.gz")
    report = tmp_path / "eval"
    assert main(["evaluate-generation", str(fasta), "--real", str(real), "--out", str(report)]) == 0
    data = json.loads((report / "report.json").read_text())
    rows = data["rows"]
    assert set(rows) == {"generated vs real", "real vs real (held-out halves)",
                         "uniform random vs real"}  # fmt: skip
    assert (report / "cgr.png").stat().st_size > 10_000
    assert "kmer4_js_bits" in (report / "report.md").read_text()


def test_set_distances_are_zero_for_a_set_and_itself_and_grow_with_difference():
    rng = np.random.default_rng(0)
    at_rich = [bytes(rng.choice(list(b"AATTGC"), size=300).astype(np.uint8)) for _ in range(8)]
    uniform = [bytes(rng.choice(list(b"ACGT"), size=300).astype(np.uint8)) for _ in range(8)]
    same = compare_sets(at_rich, at_rich, topo_pairs=2)
    assert same["kmer4_js_bits"] == 0 and same["gc_difference"] == 0
    assert same["persistence_w1"] == pytest.approx(0, abs=1e-9)
    other = compare_sets(at_rich, uniform, topo_pairs=2)
    assert other["gc_difference"] > 0.1 and other["kmer4_js_bits"] > 0.02
    assert other["fcgr_energy"] > 0 and other["walk_energy"] > 0


def test_class_weights_balance_the_classes_in_the_loss():
    from nucleo.downstream.finetune import _class_weights

    labels = np.array([0] * 90 + [1] * 10)
    weights = _class_weights(labels, 3)
    assert weights[2] == 0  # an absent class gets no weight
    counts = np.bincount(labels, minlength=3)
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])


def test_tasks_commands_build_convert_and_describe(tmp_path, capsys):
    args = ["tasks", "build", "coding_vs_intergenic", "--out", str(tmp_path / "c"),
            "--length", "60", "--train-per-class", "20", "--test-per-class", "10",
            "--test-group", "Aster_yellows"]  # fmt: skip
    for path in GENBANK:
        args += ["--annotations", str(path)]
    assert main(args) == 0
    assert main(["tasks", "convert", str(tmp_path / "c"), "--out", str(tmp_path / "gb"),
                 "--layout", "genomic-benchmarks"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["tasks", "info", str(tmp_path / "gb")]) == 0
    out = capsys.readouterr().out
    assert "(genomic-benchmarks)" in out and "test: 20 sequences (coding 10, intergenic 10)" in out
    assert main(["tasks", "info", str(tmp_path)]) == 2  # not a task folder: a clear error
    assert "not a task folder" in capsys.readouterr().err
