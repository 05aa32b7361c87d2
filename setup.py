from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="looplm-mega",
    version="0.1.0",
    description="Pretraining system for looped language models (Ouro / LoopLM) on DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["looplm_mega", "looplm_mega.*"]),
    include_package_data=True,
    package_data={"looplm_mega": ["model/presets/*.yaml", "eval/tasks/*/*.yaml", "eval/tasks/*/*.jsonl"]},
    # What the code needs: lower bounds at the first releases with the APIs it calls. The versions
    # tested are pinned in constraints.txt (install with -c constraints.txt; .ci/lock refreshes it).
    install_requires=[
        # 2.7: scale_grads of torch.distributed.pipelining's schedules (parallel/pipeline.py).
        # Without -c constraints.txt an unpinned torch is the default (CUDA) build of the index.
        "torch>=2.7",
        # 0.16: lazy_mode of zero_to_fp32's get_fp32_state_dict_from_zero_checkpoint (consolidation).
        "deepspeed>=0.16",
        "numpy>=1.24",
        "tokenizers>=0.15",
        "datasets>=2.14",  # Hugging Face dataset inputs of tools/preprocess_data.py
        "pyarrow>=12",  # Parquet inputs of tools/preprocess_data.py
        "safetensors>=0.4",
        # 0.9: Encoding.encode_to_numpy; byte-level BPE preprocessing encodes through it where it
        # verifiably gives the tokenizer's ids (looplm_mega/data/fast_bpe.py).
        "tiktoken>=0.9",
        "pyyaml>=6",
        "tqdm>=4.62",
        "wandb>=0.15",
        "tensorboard>=2.14",  # the run's event files (torch.utils.tensorboard writes them)
        "xxhash>=3",  # checksums of checkpoint files (training/checkpoint.py)
        "zstandard>=0.20",  # .jsonl.zst inputs of tools/preprocess_data.py
    ],
    extras_require={
        # NVIDIA apex is not on the package index (the index's "apex" is an unrelated project):
        # its kernels are used only when a user has built it; torch has fused AdamW and RMSNorm.
        "gpu": ["flash-attn>=2.5"],
        # lm-eval: the `looplm` harness model (looplm_mega/eval/harness.py); matplotlib: the PNG plots
        # of tools/eval_loops.py and tools/mano_collect.py.
        "eval": ["lm-eval>=0.4", "matplotlib>=3.5"],
        # The tests cover the evaluation tools too.
        "dev": ["pytest>=8", "pytest-timeout>=2.1", "lm-eval>=0.4", "matplotlib>=3.5"],
    },
)
