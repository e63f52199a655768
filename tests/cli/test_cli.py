"""The nucleo command: data build/verify/summary, list, config, and its error exits."""

from __future__ import annotations

from nucleo.cli.main import main
from tests.conftest import SAMPLE, sample_file


def test_data_build_verify_summary(tmp_path, capsys):
    out = tmp_path / "shards"
    code = main(
        [
            "data",
            "build",
            "--input",
            f"viral={sample_file('viral/lambda.fasta.gz')}",
            "--input",
            f"plasmid={sample_file('plasmid/NC_005816.gb.gz')}",
            "--out",
            str(out),
            "--min-shards",
            "2",
        ]
    )
    assert code == 0 and (out / "manifest.json").is_file()
    assert main(["data", "verify", "--shards", str(out)]) == 0
    assert main(["data", "summary", "--shards", str(out)]) == 0
    text = capsys.readouterr().out
    assert "every shard matches" in text and "viral" in text and "plasmid" in text
    assert main(["data", "build", "--sources", str(SAMPLE / "sources.tsv"), "--out", str(out)]) == 2
    assert "holds a shard set; pass --overwrite" in capsys.readouterr().err


def test_data_build_reports_malformed_input(tmp_path, capsys):
    bad = tmp_path / "bad.fa"
    bad.write_text(">a\nACGT\nACXT\n")
    code = main(["data", "build", "--input", f"viral={bad}", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "'X'" in err
    assert main(["data", "build", "--input", "no-equals-sign", "--out", str(tmp_path / "o")]) == 2
    assert "KINGDOM=PATH" in capsys.readouterr().err


def test_list_and_config(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "transformer" in text and "parameters" in text and "ce" in text and "char" in text
    assert main(["config", "--set", "train.max_steps=7", "--losses", "ce"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["config", "--set", "train.lrr=1"]) == 2
    assert "config error: train.lrr" in capsys.readouterr().err
    assert main(["config", "--arch", "nope"]) == 2
    assert "known: caduceus, hybrid, hyena, mamba, multires, transformer" in capsys.readouterr().err


def test_export_without_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "no complete, intact checkpoint" in capsys.readouterr().err


def test_data_bpe_and_build_from_folders_and_tables(tmp_path, capsys, sample_shards):
    out = tmp_path / "bpe.json"
    args = ["data", "bpe", "--shards", str(sample_shards), "--out", str(out)]
    assert main([*args, "--vocab-size", "64", "--max-bases", "200000"]) == 0
    assert "data.tokenizer=bpe" in capsys.readouterr().out
    from data_pipeline.tokenizers import build_tokenizer

    assert build_tokenizer("bpe", {"path": str(out)}).vocab_size == 64
    assert main(["data", "bpe", "--shards", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no shard manifest" in capsys.readouterr().err

    # a kingdom-per-folder tree and a parquet table, sharded together
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "tree" / "viral").mkdir(parents=True)
    shutil.copy(sample_file("viral/lambda.fasta.gz"), tmp_path / "tree" / "viral")
    table = pa.table({"sequence": ["ACGT" * 500, "GGCCTA" * 400], "id": ["s1", "s2"],
                      "kingdom": ["plasmid", "plasmid"]})  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    shards = tmp_path / "mixed"
    tree, parquet = str(tmp_path / "tree"), str(tmp_path / "t.parquet")
    code = main(["data", "build", "--folder", tree, "--table", parquet, "--out", str(shards),
                 "--min-shards", "1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert main(["data", "summary", "--shards", str(shards)]) == 0
    text = capsys.readouterr().out
    assert "viral" in text and "plasmid" in text
    code = main(["data", "build", "--table", str(tmp_path / "t.parquet"), "--sequence-column",
                 "seq", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert code == 2 and "seq" in capsys.readouterr().err


def test_embed_names_the_formats_it_writes_before_reading_anything(tmp_path, capsys):
    """``embed --out x.csv`` used to write ``x.csv.npy``; now it stops, in one line."""
    code = main(["embed", str(tmp_path / "no-export"), str(tmp_path / "no.fa"),
                 "--out", str(tmp_path / "x.csv")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "x.csv: name a .npy or a .parquet file" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
