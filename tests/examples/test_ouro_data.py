"""The Ouro recipe's data: the curricula's mixtures against the paper's tables, every prefix they
name made by examples/recipes/ouro_data.py, and its fetching and tokenizing on small local data."""

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from looplm_mega.data.indexed import IndexedDataset
from looplm_mega.data.preprocess import PreprocessConfig, output_prefix, preprocess
from looplm_mega.data.tokenizer import train_bpe_tokenizer
from looplm_mega.training.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
CURRICULA = [ROOT / "configs/curriculum/ouro_1_4b.yaml", ROOT / "configs/curriculum/ouro_2_6b.yaml"]
RECIPES = [ROOT / "examples/recipes/ouro_1_4b.sh", ROOT / "examples/recipes/ouro_2_6b.sh"]

# The paper's mixtures (section 4.2, Tables 4 and 5; ../shared/OURO.md), by the names the paper uses.
STAGE1 = {"Nemotron-CC": 73.4, "MAP-CC": 13.0, "Ultra-FineWeb-zh": 2.0, "OpenCoder-pretrain": 7.5, "MegaMath-web": 4.1}
STAGE2 = {"Nemotron-CC high-quality": 66.5, "Nemotron-CC-Math-v1": 15.0, "MegaMath high-quality": 4.6,
          "OpenCoder annealing": 0.5, "Nemotron-Pretraining-Code-v1 Synthetic-Code": 3.8,
          "Nemotron-Pretraining-SFT-v1 SFT-Code": 3.4, "Nemotron-Pretraining-SFT-v1 SFT-General": 6.2}
STAGE3 = {"ProLong 64K": 1.0}
CHINESE = {"MAP-CC", "Ultra-FineWeb-zh"}  # left out from Stage 2 on, replay included


def _stage4() -> dict:
    """SFT 30%, Stage 1 replay 10%, Stage 2 replay 60%, each replay in its stage's proportions."""
    stage1 = {k: v for k, v in STAGE1.items() if k not in CHINESE}
    mix = {"Mid-training SFT mix": 30.0}
    for table, share in ((stage1, 10.0), (STAGE2, 60.0)):
        for name, weight in table.items():
            mix[name] = mix.get(name, 0.0) + share * weight / sum(table.values())
    return mix


STAGES = {"pretrain_1a": STAGE1, "pretrain_1b": STAGE1, "ct_annealing": STAGE2, "long_ct": STAGE3,
          "mid_training": _stage4(), "gate_training": _stage4()}


def _load_tool():
    spec = importlib.util.spec_from_file_location("ouro_data", ROOT / "examples/recipes/ouro_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ouro_data = _load_tool()


def _stage_mixtures(path: Path) -> dict[str, dict[str, float]]:
    """Stage name -> {prefix: weight normalised to 1}, following the data each stage inherits."""
    config = load_run_config(path)
    prefixes, weights = config.data.prefixes, config.data.weights
    mixtures = {}
    for stage in config.curriculum:
        if stage.data is not None:
            prefixes, weights = stage.data.prefixes, stage.data.weights
        weights = weights or [1.0] * len(prefixes)
        mixtures[stage.name] = {p: w / sum(weights) for p, w in zip(prefixes, weights)}
    return mixtures


@pytest.mark.parametrize("curriculum", CURRICULA, ids=lambda p: p.stem)
def test_curriculum_mixtures_are_the_papers(curriculum):
    by_paper = {s.paper: s.output("data") for s in ouro_data.load_sources().values()}
    mixtures = _stage_mixtures(curriculum)
    assert list(mixtures) == list(STAGES)
    for stage, table in STAGES.items():
        expected = {by_paper[name]: weight / sum(table.values()) for name, weight in table.items()}
        assert mixtures[stage].keys() == expected.keys(), stage
        for prefix, weight in expected.items():
            assert math.isclose(mixtures[stage][prefix], weight, abs_tol=1e-4), (stage, prefix)


def test_every_prefix_a_curriculum_names_is_made_by_the_recipe_and_every_source_is_used():
    sources = ouro_data.load_sources()
    made = {s.output("data") for s in sources.values()}
    named = {p for path in CURRICULA for mixture in _stage_mixtures(path).values() for p in mixture}
    named |= {p for path in CURRICULA for p in load_run_config(path).data.prefixes}
    assert named <= made, sorted(named - made)
    assert made <= named, sorted(made - named)
    assert len({s.paper for s in sources.values()}) == len(sources)  # one source per name of the paper
    for recipe in RECIPES:  # the recipes tokenize into data/, where the curricula look
        text = recipe.read_text().replace("\\\n", " ")
        assert "examples/recipes/ouro_data.py preprocess" in text and "--data-dir data " in text
    assert "examples/recipes/ouro_data.py download" in (ROOT / "examples/recipes/download_artifacts.sh").read_text()


def test_output_prefixes_are_what_preprocessing_writes():
    for source in ouro_data.load_sources().values():
        assert source.output("data") == output_prefix(Path("data") / source.name, source.key)


@pytest.mark.parametrize("entry,message", [
    ({"paper": "X"}, "needs `paper` and exactly one of"),
    ({"paper": "X", "hub": {"repo": "a/b"}, "local": {"env": "Y"}}, "needs `paper` and exactly one of .*has hub, local"),
    ({"paper": "X", "hub": {"repo": "a/b", "subset": "c"}}, "a hub entry takes"),
    ({"paper": "X", "parts": []}, "parts must be a list"),
    ({"paper": "X", "mds": {"repo": "a/b", "tokeniser": "c"}}, "mds takes repo, tokenizer"),
])
def test_a_bad_source_entry_is_named(tmp_path, entry, message):
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump({"sources": {"broken": entry}}))
    with pytest.raises(ouro_data.SourceError, match=f"source broken: {message}"):
        ouro_data.load_sources(path)
    with pytest.raises(ouro_data.SourceError, match="--only: no source nope"):
        ouro_data.select(ouro_data.load_sources(), "nemotron_cc,nope")


def _zst_jsonl(texts) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


def test_commoncrawl_files_are_filtered_renamed_and_not_fetched_twice(tmp_path):
    """A Common Crawl path list served from file:// URLs, as data.commoncrawl.org serves Nemotron-CC."""
    site = tmp_path / "site"
    paths = [f"contrib/Nemotron/Nemotron-CC/data-jsonl/quality={q}/kind=actual/part-{i}.jsonl.zstd"
             for i, q in enumerate(["high", "medium-high", "high"])]
    for i, path in enumerate(paths):
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_bytes(_zst_jsonl([f"document {i}"]))
    listing = site / "contrib/Nemotron/Nemotron-CC/data-jsonl.paths.gz"
    listing.write_bytes(gzip.compress("\n".join(paths).encode()))
    source = ouro_data.Source("hq", "HQ", "commoncrawl", {"paths": listing.as_uri(), "keep": ["quality=high/"]})
    artifacts, lines = tmp_path / "artifacts", []
    ouro_data.download(source, artifacts, lines.append)
    got = sorted(p.relative_to(ouro_data.commoncrawl_dir(artifacts)).as_posix()
                 for p in ouro_data.commoncrawl_dir(artifacts).rglob("*") if p.is_file())
    assert got == sorted(p.removesuffix("d") for p in (paths[0], paths[2]))  # .jsonl.zstd -> .jsonl.zst
    ouro_data.download(source, artifacts, lines.append)
    assert lines[-1].endswith("(2 were there)")
    plan = ouro_data.preprocess_plan(source, artifacts)
    assert [Path(f).name for f in plan[0]["input"]] == ["part-0.jsonl.zst", "part-2.jsonl.zst"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer([f"document number {i} with some words" for i in range(50)], vocab_size=300, path=path)
    return str(path)


def _documents(prefix):
    dataset = IndexedDataset(prefix)
    return [np.asarray(dataset[i]).tolist() for i in range(len(dataset))]


def test_a_gzip_file_cut_into_parts_is_tokenized_as_the_whole_file(tmp_path, tokenizer):
    texts = [f"document number {i} " * (i + 1) for i in range(30)]
    whole = tmp_path / "whole.jsonl.gz"
    whole.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    preprocess(PreprocessConfig(input=[str(whole)], output_prefix=str(tmp_path / "reference"), tokenizer=tokenizer,
                                append_eod=True))
    folder = tmp_path / "artifacts/datasets/cut"
    folder.mkdir(parents=True)
    data = whole.read_bytes()
    for i in range(3):  # byte ranges, as MAP-CC's zh_cc.jsonl.gz.part01, ... are
        (folder / f"zh_cc.jsonl.gz.part{i + 1:02d}").write_bytes(data[i * len(data) // 3:(i + 1) * len(data) // 3])
    source = ouro_data.Source("cut", "Cut", "hub_files", {"repo": "a/b", "join": True})
    ouro_data.preprocess_source(source, tmp_path / "artifacts", tokenizer, tmp_path / "data", 1, log=lambda _: None)
    assert _documents(source.output(tmp_path / "data")) == _documents(output_prefix(tmp_path / "reference", "text"))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cut_text_document.bin", "cut_text_document.idx"]


def test_parts_are_tokenized_one_by_one_and_concatenated(tmp_path, tokenizer):
    """`parts` of a dataset folder (as load_dataset streams a Hub dataset's configurations)."""
    for folder, texts in (("a", ["document number 1", "document number 2"]), ("b", ["document number 3"])):
        (tmp_path / "repo" / folder).mkdir(parents=True)
        (tmp_path / "repo" / folder / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    repo = str(tmp_path / "repo")
    source = ouro_data.Source("two", "Two", "parts", [], parts=[{"repo": repo, "data_dir": "a"},
                                                               {"repo": repo, "data_dir": "b"}])
    ouro_data.preprocess_source(source, tmp_path / "artifacts", tokenizer, tmp_path / "data", 1, log=lambda _: None)
    assert len(_documents(source.output(tmp_path / "data"))) == 3
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["two_text_document.bin", "two_text_document.idx"]
    lines = []
    ouro_data.preprocess_source(source, tmp_path / "artifacts", tokenizer, tmp_path / "data", 1, log=lines.append)
    assert lines == [f"two: {source.output(tmp_path / 'data')} is there"]


def test_token_shards_are_cut_into_documents_and_written_as_jsonl(tmp_path):
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    sample = {"input_ids": np.arange(10, dtype=np.uint32), "indices": [(0, 3), (3, 3), (3, 10)]}
    assert list(ouro_data.mds_documents(sample, decode)) == ["0 1 2", "3 4 5 6 7 8 9"]  # the empty one is left out
    assert list(ouro_data.mds_documents({"input_ids": [5, 6]}, decode)) == ["5 6"]
    count = ouro_data.write_jsonl_shards((f"doc {i}" for i in range(5)), tmp_path / "text", per_file=2)
    import zstandard

    files = sorted((tmp_path / "text").iterdir())
    assert count == 5 and [f.name for f in files] == [f"part-{i:05d}.jsonl.zst" for i in range(3)]
    lines = [json.loads(line)["text"] for f in files
             for line in zstandard.ZstdDecompressor().decompress(f.read_bytes(), max_output_size=1 << 20).splitlines()]
    assert lines == [f"doc {i}" for i in range(5)]


def test_sources_without_their_input_say_what_to_do(tmp_path, monkeypatch):
    sources = ouro_data.load_sources()
    monkeypatch.delenv("OURO_SFT_DATA", raising=False)
    with pytest.raises(ouro_data.SourceError, match="mid_training_sft: set OURO_SFT_DATA"):
        ouro_data.preprocess_plan(sources["mid_training_sft"], tmp_path)
    with pytest.raises(ouro_data.SourceError, match=r"map_cc: no downloaded files in .* \(run `download` first\)"):
        ouro_data.preprocess_plan(sources["map_cc"], tmp_path)
    with pytest.raises(ouro_data.SourceError, match="prolong_64k: no decoded text .* `decode-mds`"):
        ouro_data.preprocess_plan(sources["prolong_64k"], tmp_path)
    plan = ouro_data.preprocess_plan(sources["megamath_hq"], tmp_path)
    assert plan == [{"input": ["LLM360/MegaMath"], "input_format": "hf", "hf_name": None,
                     "hf_data_dir": "megamath-web-pro", "hf_split": "train"}]
