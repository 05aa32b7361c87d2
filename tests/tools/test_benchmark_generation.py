import json

import numpy as np
import pytest

from tools.benchmark_generation import main


def test_generation_benchmark_reports_every_variant_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--preset", "tiny", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--output", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"full", "last", "mean", "first", "q_exit 0.5", "static 2", "uncached"}
    assert results["full"]["vs_full"] == 1.0 and all(r["tokens_per_s"] > 0 for r in results.values())
    assert results["last"]["cache_mib"] * 4 == pytest.approx(results["full"]["cache_mib"])
    assert results["static 2"]["loops_per_token"] == 2.0
    assert "| uncached |" in capsys.readouterr().out


def test_generation_benchmark_measures_quality_on_held_out_text(tmp_path, capsys):
    """With --data: prompts from the validation documents; the full cache scores the text exactly as a
    forward pass does, and its greedy tokens are its own."""
    from looplm_mega.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "text_document") as writer:
        for _ in range(20):  # 19 training documents, 1 validation document of 3 windows
            writer.add_document(rng.integers(1, 4096, size=40))
    out = tmp_path / "bench.json"
    main(["--preset", "tiny", "--batch", "3", "--prompt-len", "8", "--new-tokens", "5", "--repeats", "1",
          "--data", str(tmp_path / "text_document"), "--output", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["full"]["agreement"] == 1.0 and results["uncached"]["agreement"] == 1.0
    assert results["full"]["text_ce"] == pytest.approx(results["uncached"]["text_ce"], abs=1e-4)
    assert results["first"]["text_ce"] != pytest.approx(results["full"]["text_ce"], abs=1e-4)
    assert all(0 <= r["agreement"] <= 1 and r["text_ce"] > 0 for r in results.values())
    assert "| greedy tokens as full | CE of the text |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds 3 windows of 13 tokens, 4 asked"):
        main(["--preset", "tiny", "--batch", "4", "--prompt-len", "8", "--new-tokens", "5", "--repeats", "1",
              "--data", str(tmp_path / "text_document")])


def test_generation_benchmark_rejects_an_empty_batch(capsys):
    with pytest.raises(SystemExit):
        main(["--batch", "0"])
    assert "--batch" in capsys.readouterr().err
