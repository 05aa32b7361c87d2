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
        # 0.19.7: the alignment paddings that zero_to_fp32's ZeRO-1/2 merge takes, which Adam's
        # moments are consolidated through (training/optimizer.py; lazy_mode of consolidation came
        # in 0.16). Below 0.20: those are private functions of zero_to_fp32 and of ZeRO-3's optimizer,
        # whose signatures change between releases (0.19.7 changed one); a newer release is tried
        # with .ci/lock first.
        "deepspeed>=0.19.7,<0.20",
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
        # flash-attn builds against the installed torch: pip install flash-attn --no-build-isolation
        # (README, "GPU set-up"). NVIDIA apex is not used: torch's fused RMSNorm and DeepSpeed's
        # fused Adam do its work (and the package index's "apex" is an unrelated project).
        "gpu": ["flash-attn>=2.5"],
        # lm-eval: the `looplm` harness model (looplm_mega/eval/harness.py); matplotlib: the PNG plots
        # of tools/eval_loops.py and tools/mano_collect.py.
        "eval": ["lm-eval>=0.4", "matplotlib>=3.5"],
        # examples/recipes/ouro_data.py: downloads of the Ouro data sources. Its decode-mds command
        # needs mosaicml-streaming, which pins packages this project does not take: it runs in an
        # environment of its own (download_artifacts.sh makes it), and is not in constraints.txt.
        "recipes": ["huggingface_hub>=0.20", "mosaicml-streaming>=0.7"],
        # The tests cover the evaluation tools too.
        "dev": ["pytest>=8", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "lm-eval>=0.4", "matplotlib>=3.5"],
    },
)
