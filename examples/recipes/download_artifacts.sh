#!/bin/bash
# Run on a login node (it has the network; compute nodes often do not). Fetches what the Ouro
# recipes need into shared storage, so jobs run with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1:
#   - the tokenizer (the released Ouro one: a 49,152-token byte-level BPE),
#   - optionally the released 1.4B checkpoint (to continue pretraining from it, or to compare),
#   - the raw corpora as Parquet/JSONL files, tokenized later by tools/preprocess_data.py.
#
#   ARTIFACTS=/shared/ouro bash examples/recipes/download_artifacts.sh
#   ARTIFACTS=/shared/ouro DATASETS="HuggingFaceFW/fineweb-edu:sample/10BT" bash examples/recipes/download_artifacts.sh
#
# Environment (defaults):
#   ARTIFACTS=artifacts                  where everything goes (shared by all nodes)
#   MODEL=ByteDance/Ouro-1.4B            the released checkpoint and its tokenizer
#   WITH_WEIGHTS=0                       1: also the released safetensors (about 3 GB in bf16)
#   DATASETS="HuggingFaceFW/fineweb-edu:sample/10BT"   space-separated REPO[:SUBFOLDER] of dataset files
set -euo pipefail
ARTIFACTS=${ARTIFACTS:-artifacts}
MODEL=${MODEL:-ByteDance/Ouro-1.4B}
WITH_WEIGHTS=${WITH_WEIGHTS:-0}
DATASETS=${DATASETS:-"HuggingFaceFW/fineweb-edu:sample/10BT"}
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

# Dataset files as they are stored on the Hub (Parquet): preprocess_data.py reads them directly.
for spec in $DATASETS; do
  repo=${spec%%:*}; folder=${spec#*:}; [ "$folder" = "$spec" ] && folder=""
  python - "$repo" "$ARTIFACTS/datasets/$(basename "$repo")" "$folder" <<'PY'
import sys
from huggingface_hub import snapshot_download
repo, target, folder = sys.argv[1:4]
pattern = [f"{folder}/*"] if folder else None
print(snapshot_download(repo, repo_type="dataset", local_dir=target, allow_patterns=pattern))
PY
done
echo "artifacts in $ARTIFACTS; on compute nodes: export HF_HOME=$HF_HOME HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"
