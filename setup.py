from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="looplm-mega",
    version="0.1.0",
    description="Pretraining system for looped language models (Ouro / LoopLM) on DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["looplm_mega", "looplm_mega.*"]),
    include_package_data=True,
    package_data={"looplm_mega": ["eval/tasks/*/*.yaml", "eval/tasks/*/*.jsonl"]},
    install_requires=[
        # >= 2.4 so that the CPU wheel 2.13.0 on these machines satisfies it without a download.
        "torch>=2.4",
        "deepspeed>=0.14",
        "numpy",
        "tokenizers>=0.15",
        "datasets",
        "safetensors",
        "pyyaml",
        "tqdm",
        "wandb",
        "zstandard",  # .jsonl.zst inputs of tools/preprocess_data.py
    ],
    extras_require={
        # NVIDIA apex is not on the package index (the index's "apex" is an unrelated project):
        # its kernels are used only when a user has built it; torch has fused AdamW and RMSNorm.
        "gpu": ["flash-attn>=2.5"],
        # lm-eval: the `looplm` harness model (looplm_mega/eval/harness.py); matplotlib: the PNG plots
        # of tools/eval_steps.py and tools/mano_collect.py.
        "eval": ["lm-eval>=0.4", "matplotlib"],
        # The tests cover the evaluation tools too.
        "dev": ["pytest>=7", "pytest-timeout", "lm-eval>=0.4", "matplotlib"],
    },
)
