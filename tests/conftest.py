"""Shared fixtures: the bundled real genome sample and shards built from it; the suite's
device (one decision, as in nucleo.core.device) and the ``gpu`` marker."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from architectures.kernels import Kernel, load
from data_pipeline.readers import read_sequences
from data_pipeline.shards import ShardOptions, SourceFile, build_shards, read_sources_tsv
from data_pipeline.tokenizers import CharTokenizer
from experiments.fault_suite import mount_tmpfs
from nucleo.core.device import resolve

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_pipeline" / "sample"

# The suite runs against the GPU when there is one, unless NUCLEO_TEST_DEVICE=cpu says
# otherwise (or DS_ACCELERATOR, which DeepSpeed launches read, already says which).
TOLD = os.environ.get("NUCLEO_TEST_DEVICE") or os.environ.get("DS_ACCELERATOR")
DEVICE = resolve(TOLD or "auto", "NUCLEO_TEST_DEVICE")
os.environ["DS_ACCELERATOR"] = DEVICE.type  # launched processes decide the same way
CUDA_COUNT = torch.cuda.device_count() if DEVICE.type == "cuda" else 0


def launch_env(procs: int = 1) -> dict[str, str]:
    """Environment for a ``deepspeed`` launch of ``procs`` processes from the tests: on the
    suite's device, or on CPU (gloo) when it has fewer GPUs than processes."""
    accel = DEVICE.type if DEVICE.type == "cpu" or procs <= CUDA_COUNT else "cpu"
    env = {**os.environ, "DS_ACCELERATOR": accel, "PYTHONUNBUFFERED": "1"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # each process takes its share
        env.pop(name, None)
    return env


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run where the suite's device is CUDA, and are skipped elsewhere."""
    if DEVICE.type == "cuda":
        return
    reason = "needs a CUDA GPU" + (f" (the suite was told to run on {TOLD})" if TOLD else "")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: tiny models decoding a token at a time only wait on a
    second OpenMP thread (milliseconds per matrix product on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaded_or_fail(kernel: Kernel):
    """The kernel's function on this GPU. Skips when its package is not installed; *fails*
    when it is installed but does not load or run (a broken install must not look skipped)."""
    if not kernel.installed():
        pytest.skip(f"{kernel.package} is not installed (the gpu extra)")
    fn, why = load(kernel)
    assert fn is not None, f"{kernel.package} is installed but its kernel cannot run: {why}"
    return fn


def sample_file(relative: str) -> Path:
    return SAMPLE / relative


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path | None]]:
    """``small_disk("1m")``: a folder on a tmpfs of that size (a disk that really fills), or
    None where the machine allows no mount; unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str) -> Path | None:
        folder = tmp_path / f"disk-{len(mounted)}"
        if not mount_tmpfs(folder, size):
            return None
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)  # files may be open


@pytest.fixture(scope="session")
def yeast_windows() -> Callable[[int, int, int], torch.Tensor]:
    """``windows(length, count, seed)``: ``count`` random windows [count, length] of
    S. cerevisiae chromosome I (real DNA for the learning tests)."""
    (record,) = read_sequences(sample_file("fungi/ScerR64_I.fna.gz"))
    tokens = torch.from_numpy(CharTokenizer().encode(bytes(record.seq)))

    def windows(length: int, count: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - length, (count,), generator=gen)
        return torch.stack([tokens[s : s + length] for s in starts.tolist()])

    return windows


@pytest.fixture(scope="session")
def sample_sources() -> list[SourceFile]:
    return read_sources_tsv(SAMPLE / "sources.tsv")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory, sample_sources) -> Path:
    """The whole bundled sample, sharded with the default options."""
    out = tmp_path_factory.mktemp("shards") / "sample"
    build_shards(sample_sources, out, ShardOptions(), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def four_kingdom_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real genomes of four kingdoms, one training shard each (no validation split), so
    that the kingdom of a window tells which shard it came from."""
    sources = [
        SourceFile(sample_file("viral/lambda.fasta.gz"), "viral"),
        SourceFile(sample_file("plasmid/deinococcus_MP1.fna.gz"), "plasmid"),
        SourceFile(sample_file("plastid/gingko.fasta.gz"), "plastid"),
        SourceFile(sample_file("fungi/ScerR64_I.fna.gz"), "fungi"),
    ]
    out = tmp_path_factory.mktemp("shards") / "four"
    options = ShardOptions(chunk_len=8192, min_shards=1, val_fraction=0.0)
    build_shards(sources, out, options, log=lambda _: None)
    return out


#: a real soft-masked record: 60 kb of D. melanogaster chr2R (dm3), repeats in lower case
SOFT_MASKED = ROOT / "tests" / "fixtures" / "softmasked" / "dm3_chr2R_6.5M.fa.xz"


@pytest.fixture(scope="session")
def masked_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A format-2 shard set that keeps the soft mask: the dm3 chr2R segment (two 30 kb
    records, ~38% repeats) and lambda, in 4 kb chunks, half the records held out."""
    sources = [
        SourceFile(SOFT_MASKED, "invertebrate"),
        SourceFile(sample_file("viral/lambda.fasta.gz"), "viral"),
    ]
    out = tmp_path_factory.mktemp("shards") / "masked"
    options = ShardOptions(chunk_len=4096, min_shards=2, val_fraction=0.5)
    build_shards(sources, out, options, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def sample_bpe(tmp_path_factory: pytest.TempPathFactory, sample_shards) -> Path:
    """A 256-token BPE learned on 1 Mb of the sample's training split (about a second)."""
    from data_pipeline.tokenizers import train_bpe

    out = tmp_path_factory.mktemp("bpe") / "bpe256.json"
    train_bpe(sample_shards, out, vocab_size=256, max_bases=1_000_000, log=lambda _: None)
    return out
