"""Run a function in N processes joined by a gloo process group, as the launchers would."""

from __future__ import annotations

import multiprocessing
import os
import time

import torch
import torch.multiprocessing as mp

from looplm_mega.training.distributed import cpu_threads, free_port

# Ranks are forked from a forkserver that imports torch, DeepSpeed and the trainer once for the
# whole test session: a spawned rank spends seconds of CPU on those imports, which over the
# suite's hundred-odd multi-process runs was most of its time (measured: starting 2 ranks took
# 8 s spawned, 0.1 s forked). The server is a fresh interpreter (no OpenMP threads yet), so
# forking it is as safe as spawning; the test process itself is never forked.
multiprocessing.set_forkserver_preload(["torch", "deepspeed", "looplm_mega.training.trainer"])


def _entry(rank: int, fn, world_size: int, port: int, environ: dict, cwd: str, args: tuple) -> None:
    # A forked rank inherits the server's environment and directory, not the test's.
    os.environ.clear()
    # The ranks split the cores, also those that never call init_distributed (which would, from
    # LOCAL_WORLD_SIZE, set here as torchrun sets it).
    torch.set_num_threads(cpu_threads(world_size))
    os.environ.update(environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(cwd)
    fn(*args)


def run_distributed(fn, world_size: int, *args, timeout: float = 600) -> None:
    """fn(*args) on every rank; fn must be importable (a module-level function). A rank's
    exception is raised here; a run longer than `timeout` seconds is killed and fails."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), dict(os.environ), os.getcwd(), args),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        # join() waits on pipes that a process started by a rank can keep open after the rank
        # has exited; the exit codes are the ground truth.
        if all(not p.is_alive() for p in context.processes):
            failed = [(rank, p.exitcode) for rank, p in enumerate(context.processes) if p.exitcode]
            if failed:
                raise RuntimeError(f"ranks exited with codes {failed}")
            return
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} processes ran past {timeout} s")
