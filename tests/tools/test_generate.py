import pytest

from tests.helpers import write_tiny_model_and_tokenizer
from tools.generate import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    write_tiny_model_and_tokenizer(root)
    return root


def test_cli_streams_one_prompt_and_reports_speed_and_loops(model_dir, capsys):
    main(["--model", str(model_dir / "model"), "--tokenizer", str(model_dir / "tokenizer.json"), "--prompt", "def ",
          "--max-new-tokens", "8", "--kv-sharing", "mean", "--exit", "static", "--exit-loop", "2"])
    out, err = capsys.readouterr()
    assert out.startswith("def ")
    assert "8 tokens" in err and "2.00 loops per token of 4" in err and "(mean)" in err


def test_cli_batches_prompts_from_a_file(model_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nreturn\n\n")
    main(["--model", str(model_dir / "model"), "--tokenizer", str(model_dir / "tokenizer.json"),
          "--prompts-file", str(prompts), "--max-new-tokens", "4", "--temperature", "0.8", "--top-p", "0.9"])
    out, err = capsys.readouterr()
    assert "--- 'def '" in out and "--- 'return'" in out and "8 tokens" in err


def test_cli_names_a_missing_prompts_file(model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir / "model"), "--prompts-file", "/nonexistent/prompts.txt"])
    assert "/nonexistent/prompts.txt: no such file" in capsys.readouterr().err
