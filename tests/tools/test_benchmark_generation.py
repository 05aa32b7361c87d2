import json

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


def test_generation_benchmark_rejects_an_empty_batch(capsys):
    with pytest.raises(SystemExit):
        main(["--batch", "0"])
    assert "--batch" in capsys.readouterr().err
