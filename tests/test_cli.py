"""The nucleo command: data build/verify/summary, list, config, and its error exits."""

from __future__ import annotations

from nucleo.cli import main
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
    assert main(["data", "verify", str(out)]) == 0
    assert main(["data", "summary", str(out)]) == 0
    text = capsys.readouterr().out
    assert "every shard matches" in text and "viral" in text and "plasmid" in text
    assert main(["data", "build", "--sources", str(SAMPLE / "sources.tsv"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


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
    assert "no complete checkpoint" in capsys.readouterr().err
