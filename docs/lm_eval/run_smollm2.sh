#!/bin/bash
# The runs of docs/lm_eval.md: SmolLM2-135M-Instruct on the first 50 ARC-Easy validation questions,
# offline, one thread. Outputs under runs/lm_eval/<name>; summarise with docs/lm_eval/summarize.py.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
OUT=runs/lm_eval
COMMON="--tasks arc_easy_local --include_path docs/lm_eval/tasks --limit 50 --device cpu --batch_size 8 --log_samples"
mkdir -p $OUT
DIR=$($PY -c "from attrsparse.core.models import describe_source; print(describe_source('smollm2-135m')['cache_dir'])")
$PY -c "import attrsparse; attrsparse.load_model('smollm2-135m')"  # builds the cached copy once
run() { name=$1; shift; start=$(date +%s); "$@" $COMMON --output_path $OUT/$name > $OUT/$name.log 2>&1
        echo "$name rc=$? $(( $(date +%s) - start ))s" | tee -a $OUT/status.txt; }
run hf $PY -m lm_eval --model hf --model_args pretrained=$DIR,dtype=float32
run dense1 $PY -m attrsparse.evaluation.lm_eval_model --model attrsparse --model_args pretrained=smollm2-135m,selector=teal,ratio=1.0
for sel in wina teal cats wanda random corrected_gxo; do
  run ${sel}05 $PY -m attrsparse.evaluation.lm_eval_model --model attrsparse --model_args pretrained=smollm2-135m,selector=$sel,ratio=0.5
done
