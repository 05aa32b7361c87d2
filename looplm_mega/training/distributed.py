"""One process group for every launcher: the deepspeed launcher and torchrun set RANK / WORLD_SIZE
/ LOCAL_RANK / MASTER_ADDR; srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (the master
address then comes from the job's first node, exported by the sbatch script); a plain `python -m`
is a world of one. NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import atexit
import ctypes
import os
import random
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist


_PORTS = random.SystemRandom()  # not the seeded global generator, and unlike it not shared by forked processes


def free_port() -> int:
    """A TCP port nobody listens on now (for a master address of our own), drawn below the
    ephemeral range: a port the kernel hands out (bind to port 0) is free only until the ranks
    start, and in the seconds that takes, any outgoing connection, such as the gloo links of a
    run next door, may be given it as its local port (seen: EADDRINUSE at the rendezvous)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default; other systems' ranges start higher
    for _ in range(100):
        port = _PORTS.randrange(10000, max(10001, ephemeral_low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried was taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads(processes: int) -> int:
    """Threads for each of `processes` processes sharing this machine's cores: each taking all of
    them makes every OpenMP region wait for a core (2 ranks x 2 threads on 2 cores made small
    matmuls take milliseconds)."""
    return max(1, (os.cpu_count() or 1) // processes)


MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def return_freed_memory() -> None:
    """Make the host's freed tensors go back to the system at once. glibc serves blocks below its
    mmap threshold from heaps it keeps, and raises the threshold (up to 32 MiB) whenever a larger
    block is freed; after that a rank's resident memory stays at its highest transient (ZeRO-3's
    gathered weights, the fused head's gradient, Adam's temporaries) for the rest of the run.
    A fixed threshold (glibc's starting value, M_MMAP_THRESHOLD) keeps every tensor-sized block
    in a mapping of its own, unmapped when freed. Measured: README, "Memory per rank". A user's
    MALLOC_MMAP_THRESHOLD_ wins; other C libraries are left as they are."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library: its own policy
        return
    libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD in malloc.h


def _environment_from_slurm() -> None:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def launched_world_size() -> int:
    """The number of processes the launcher started (1 for a plain `python -m`), known before any
    process group exists."""
    _environment_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> torch.device:
    """Join (or create) the default process group; returns this process's device."""
    _environment_from_slurm()
    return_freed_memory()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(next((os.environ[k] for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
                                if os.environ.get(k, "").isdigit()), "1"))
        if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
            torch.set_num_threads(cpu_threads(local_world))
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
        atexit.register(_leave_process_groups)
        if device.type == "cpu" and dist.get_world_size() > 1:
            _unlink_shared_memory_buffer()
    return device


def shared_memory_buffer() -> Path:
    """The shared-memory all-reduce buffer DeepSpeed's CPU backend creates for this rank when all
    ranks run on one machine (its LOCAL_SIZE, which the deepspeed launcher sets, equals the world
    size): 69 MB in /dev/shm, named as deepspeed/ops/csrc/cpu/comm/shm.cpp names it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


def _unlink_shared_memory_buffer() -> None:
    """DeepSpeed never removes its buffers: every CPU run left them in /dev/shm, after a clean exit
    too, until the machine ran out of memory. Once every rank has mapped every buffer (each rank
    maps all of them inside init_distributed, so after the barrier), the names can go: the mappings
    stay valid for the rest of the run (shm_unlink removes only the name), and nothing is left
    behind however the run ends, even when it is killed."""
    dist.barrier()
    shared_memory_buffer().unlink(missing_ok=True)


def _leave_process_groups() -> None:
    """At interpreter exit (no barrier: a rank that failed must not hang the others). Groups left
    to the C++ teardown can abort the process ("terminate called without an active exception")
    while their gloo threads are destroyed. Not earlier: DeepSpeed caches the groups, and a
    process may run several trainings (tests do)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
