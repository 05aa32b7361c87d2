import subprocess
import sys

from looplm_mega.training.model_dir import read_config

from tests.distributed import run_distributed
from tests.training.runs import _pretrain, run_config, train_losses, write_dataset


def test_upcycle_a_checkpoint_check_it_and_continue_on_two_processes(tmp_path):
    dataset = write_dataset(tmp_path / "tokens")
    small = run_config(dataset, tmp_path / "small", training={"train_steps": 2, "save_interval": 0})
    run_distributed(_pretrain, 1, small)
    done = subprocess.run([sys.executable, "tools/upcycle.py", "--source", str(tmp_path / "small" / "checkpoints"),
                           "--output", str(tmp_path / "big"), "--factor", "2", "--order", "interleaved",
                           "--keep-progress", "--check-data", dataset, "--check-batches", "2", "--check-seq-length", "16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"function check ({dataset}), original" in done.stdout and "upcycled: CE per loop" in done.stdout
    assert read_config(tmp_path / "big").num_hidden_layers == 4
    big = run_config(dataset, tmp_path / "continued", model={"num_hidden_layers": 4},
                     training={"train_steps": 4, "save_interval": 0, "init_from": str(tmp_path / "big")})
    run_distributed(_pretrain, 2, big)
    assert sorted(train_losses(tmp_path / "continued")) == [3, 4]  # continued from step 2
