import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/benchmark_checkpoint.py"


def test_tiny_benchmark_times_the_save_and_the_manifest_of_its_files(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(TOOL), "--presets", "tiny", "--repeats", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| preset | parameters | files | save (s) | manifest (s) | manifest / save |" in done.stdout
    [result] = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["zero_stage"] == 2
    assert len(result["saves_s"]) == len(result["manifests_s"]) == 2
    assert all(s > 0 for s in result["saves_s"] + result["manifests_s"])
    # fp32 weights and Adam's two moments at least: the files the manifest read are the whole save.
    assert result["bytes"] >= 12 * result["parameters"]
    assert result["manifest_share"] == result["manifest_s"] / result["save_s"]
    assert f"| tiny | {result['parameters']:,} |" in done.stdout
    assert list(tmp_path.iterdir()) == [out]  # its scratch saves are gone, nothing else touched
