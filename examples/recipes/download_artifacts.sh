#!/bin/bash
# Run from the repository root on a login node (it has the network; compute nodes often do not).
# Fetches what the Ouro recipes need into shared storage, so that jobs run with HF_HUB_OFFLINE=1:
#   - the tokenizer (the released Ouro one: a 49,152-token byte-level BPE),
#   - optionally the released 1.4B checkpoint (to continue pretraining from it, or to compare),
#   - the corpora of the paper's mixtures that cannot be streamed (examples/recipes/ouro_data.yaml):
#     Nemotron-CC from Common Crawl, MAP-CC's split gzip files, ProLong's token shards (decoded to
#     text here). The other sources stream from the Hub when the recipes tokenize them
#     (examples/recipes/ouro_data.py preprocess, step 1 of ouro_1_4b.sh / ouro_2_6b.sh).
#
#   ARTIFACTS=/shared/ouro bash examples/recipes/download_artifacts.sh
#   ARTIFACTS=/shared/ouro ONLY=map_cc,prolong_64k bash examples/recipes/download_artifacts.sh
#
# Environment (defaults):
#   ARTIFACTS=artifacts                  where everything goes (shared by all nodes)
#   MODEL=ByteDance/Ouro-1.4B            the released checkpoint and its tokenizer
#   WITH_WEIGHTS=0                       1: also the released safetensors (about 3 GB in bf16)
#   ONLY=                                comma-separated sources of ouro_data.yaml (default: all)
#   HF_TOKEN                             the nvidia/* datasets are gated: accept their terms on the Hub first
set -euo pipefail
ARTIFACTS=${ARTIFACTS:-artifacts}
MODEL=${MODEL:-ByteDance/Ouro-1.4B}
WITH_WEIGHTS=${WITH_WEIGHTS:-0}
ONLY=${ONLY:-}
export HF_HOME=${HF_HOME:-$ARTIFACTS/hf_home}  # the jobs read the same cache offline
mkdir -p "$ARTIFACTS"

# The tokenizer and config always; the weights on request. huggingface_hub comes with `datasets`.
patterns='["*.json", "*.txt", "*.py"]'
[ "$WITH_WEIGHTS" = 1 ] && patterns='["*.json", "*.txt", "*.py", "*.safetensors"]'
python - "$MODEL" "$ARTIFACTS/$(basename "$MODEL")" "$patterns" <<'PY'
import json, sys
from huggingface_hub import snapshot_download
repo, target, patterns = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(snapshot_download(repo, local_dir=target, allow_patterns=patterns))
PY

# The corpora that must be on disk before tokenizing (the others need nothing here).
python examples/recipes/ouro_data.py download --artifacts "$ARTIFACTS" ${ONLY:+--only "$ONLY"}

# ProLong's shards hold Llama-3 token ids in Mosaic Data Shards: decode them to text with
# mosaicml-streaming, which pins packages the project does not take, so in an environment of its own.
if [ ! -x "$ARTIFACTS/mds-venv/bin/python" ]; then
  python -m venv "$ARTIFACTS/mds-venv"
  "$ARTIFACTS/mds-venv/bin/pip" install mosaicml-streaming tokenizers zstandard pyyaml
fi
"$ARTIFACTS/mds-venv/bin/python" examples/recipes/ouro_data.py decode-mds --artifacts "$ARTIFACTS" ${ONLY:+--only "$ONLY"}
echo "artifacts in $ARTIFACTS; on compute nodes: export HF_HOME=$HF_HOME HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
