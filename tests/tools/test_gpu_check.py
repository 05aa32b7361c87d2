import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools/gpu_check.py"
# The report of a whole dry run on the CPU (python tools/gpu_check.py --dry-run), kept to render
# the sections of the parts too slow to run here.
DRY_RUN_REPORT = Path(__file__).with_name("gpu_check_dry_run.json")


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_of_the_attention_part_writes_the_report(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(TOOL), "--dry-run", "--parts", "attention", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["kind"] == "GPU check report" and report["dry_run"] and report["passed"]
    assert report["environment"]["torch"] == torch.__version__
    part = report["parts"]["attention"]
    assert list(report["parts"]) == ["attention"] and part["status"] == "passed"
    assert set(part["checks"]) == {f"sdpa {m}: errors <= 2x the plain bf16 formula's" for m in ("causal", "documents")}
    rows = part["result"]["rows"]
    assert [(r["backend"], r["masking"]) for r in rows] == [("sdpa", "causal"), ("sdpa", "documents")]
    for row in rows:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
        assert set(row["max_abs_error"]) == {"out", "dq", "dk", "dv"} and 0 < row["max_abs_error"]["out"] < 0.1
    markdown = (out / "gpu_check.md").read_text()
    assert "## attention: passed" in markdown and "| sdpa | documents |" in markdown
    marker = json.loads((out / ".looplm-output.json").read_text())
    assert marker["kind"] == "GPU check report" and {"gpu_check.json", "gpu_check.md", "attention.log"} <= set(marker["entries"])


def test_a_folder_it_did_not_write_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as stopped:
        _tool().main(["--dry-run", "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpu_check.py: error:" in err[0] and "not written by looplm-mega" in err[0]
    assert (out / "notes.txt").read_text() == "keep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_the_full_check_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        _tool().main(["--out", str(tmp_path / "report")])
    assert stopped.value.code == 2 and "no CUDA device here; --dry-run runs" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_the_report_renders_every_part():
    tool = _tool()
    report = json.loads(DRY_RUN_REPORT.read_text())
    assert list(report["parts"]) == list(tool.LIMITS)
    markdown = tool.markdown(report)
    for name, header in [("attention", "| backend | masking | forward ms |"), ("benchmark", "| precision | path | tokens/s |"),
                         ("pretrain", "| run | steps | first loss |"), ("compile", "| fp32 | fused (compiled) |")]:
        assert f"## {name}: passed" in markdown and header in markdown
    assert "resume vs uninterrupted: max relative loss difference" in markdown
    assert "Generation (bf16, batch 4" in markdown and "torch.compile of the loop step:" in markdown
    # A part cut off at its limit shows what it had done and the end of its log; one never started says why.
    report = copy.deepcopy(report)
    report["parts"]["pretrain"].update(status="timed out", log_tail=["[train] step 5/6 | loss 5.7"])
    del report["parts"]["pretrain"]["result"]["generation"]
    report["parts"]["compile"] = {"status": "not run", "reason": "the check's time limit was reached"}
    markdown = tool.markdown(report)
    assert "## pretrain: timed out" in markdown and "[train] step 5/6 | loss 5.7" in markdown
    assert "| zero3 | 1-" in markdown and "Generation" not in markdown
    assert "## compile: not run\n\nthe check's time limit was reached" in markdown
