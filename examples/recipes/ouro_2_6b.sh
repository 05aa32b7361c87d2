#!/bin/bash
# Ouro 2.6B end to end: tokenize the corpora, pretrain through the paper's curriculum on SLURM
# (configs/curriculum/ouro_2_6b.yaml: the 1.4B's Stage 1a with 24 layers, then Stage 1b starts by
# upcycling the run to 48 layers, stacked, in the same job; the later stages as for the 1.4B), export.
# To grow an existing 1.4B run instead of training Stage 1a again, set FROM_1_4B to its Stage 1a
# boundary checkpoint: tools/upcycle.py grows it (optimizer moments carried) and the run starts at 1b.
# Run from the repository root on a login node; steps 2 and 3 are SLURM jobs. Comment out the steps
# already done when you run it again.
#
#   ARTIFACTS=/shared/ouro RUN_DIR=/shared/runs/ouro_2_6b NODES=8 bash examples/recipes/ouro_2_6b.sh
set -euo pipefail
ARTIFACTS=${ARTIFACTS:-artifacts}           # from examples/recipes/download_artifacts.sh
RUN_DIR=${RUN_DIR:-runs/ouro_2_6b}
NODES=${NODES:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TOKENIZER=${TOKENIZER:-$ARTIFACTS/Ouro-1.4B/tokenizer.json}
WORKERS=${WORKERS:-32}
CURRICULUM=${CURRICULUM:-configs/curriculum/ouro_2_6b.yaml}

# 1. Tokenize every source of the paper's mixtures (examples/recipes/ouro_data.yaml) into
#    data/<source>_text_document, the prefixes the curriculum names; sources on the Hub stream through
#    `datasets` (this step needs the network), the others were fetched by download_artifacts.sh. The
#    mid-training SFT mixture is not released: OURO_SFT_DATA names its JSONL files. Sources already
#    tokenized are skipped.
python examples/recipes/ouro_data.py preprocess --artifacts "$ARTIFACTS" --tokenizer "$TOKENIZER" \
    --data-dir data --workers "$WORKERS"

# 2. Pretrain: one job carries the run through every stage; a preempted or timed-out job is
#    requeued and resumes from its latest checkpoint (examples/slurm/pretrain.sbatch). For runs
#    longer than the partition's time limit, chain jobs on the same run directory:
#    sbatch --dependency=afterany:$PREVIOUS ...
OVERRIDES=""
if [ -n "${FROM_1_4B:-}" ]; then
  python tools/upcycle.py --source "$FROM_1_4B" --output "$RUN_DIR/upcycled" --factor 2 --order stacked \
      --keep-progress --optimizer carry
  OVERRIDES="--training.init_from $RUN_DIR/upcycled"
fi
job=$(LOOPLM_CONFIG="$CURRICULUM" LOOPLM_RUN_DIR="$RUN_DIR" LOOPLM_OVERRIDES="$OVERRIDES" \
      sbatch --parsable --nodes="$NODES" --gpus-per-node="$GPUS_PER_NODE" --ntasks-per-node="$GPUS_PER_NODE" \
      --job-name=ouro_2_6b examples/slurm/pretrain.sbatch)
echo "submitted $job; follow with: tail -f ouro_2_6b-$job.out"

# 3. When training has finished (a dependent job): consolidate, evaluate per loop step, and export
#    the released format (bf16 safetensors, config.json, tokenizer) for transformers or vLLM.
sbatch --parsable --dependency=afterok:"$job" --nodes=1 --ntasks=1 --cpus-per-task=16 --mem=128G \
    --job-name=ouro_2_6b_export --output="ouro_2_6b_export-%j.out" --wrap "set -e
python tools/convert_checkpoint.py --checkpoint $RUN_DIR/checkpoints --output $RUN_DIR/model
python tools/eval_loops.py --model $RUN_DIR/model --data data/nemotron_cc_hq_text_document --seq-length 4096 --output $RUN_DIR/eval
python tools/convert_checkpoint.py --model $RUN_DIR/model --to-hf $RUN_DIR/hf --tokenizer $TOKENIZER"
