#!/usr/bin/env bash
# golden.sh SRC OUT: run a small sweep, compare and bench (quality) on SmolLM2 and on a tiny
# saved Llama, with the package found in SRC; write normalised JSON under OUT.
set -euo pipefail
SRC=$1; OUT=$2; PY=/work/main/.venv/bin/python
export ATTRSPARSE_DATA_DIR=/work/shared/data PYTHONHASHSEED=0
mkdir -p $OUT
cd $SRC
run() { $PY -c "import sys; sys.argv=['attrsparse']+sys.argv[1:]; from attrsparse.cli import main; sys.exit(main())" "$@"; }
# tiny saved llama (same weights for both runs)
if [ ! -d /work/golden-tiny ]; then
  $PY - <<'PY'
import sys; sys.path.insert(0, "/work/main/tests")
from conftest import build_tiny, tiny_tokenizer
m = build_tiny("llama"); m.save_pretrained("/work/golden-tiny"); tiny_tokenizer().save_pretrained("/work/golden-tiny")
PY
fi
run sweep --model smollm2-135m --questions 0,1 --metrics magnitude,corrected_gxo,teal,wanda,progressive_gxo,static_gxo,random,wina,cats --ratios 0.5,0.8 --max-new-tokens 12 --out $OUT/sweep-smol > $OUT/sweep-smol.log 2>&1
run sweep --model /work/golden-tiny --data /work/main/tests/fixtures/truthfulqa_3.csv --template qa --questions 0,1,2 --metrics paper,teal,wanda,cats,wina,random,progressive_gxo --ratios 0.5 --max-new-tokens 6 --out $OUT/sweep-tiny > $OUT/sweep-tiny.log 2>&1 || echo "tiny sweep failed"
run compare --models smollm2-135m --tasks arc_easy,wikitext2 --selectors teal,wina,cats,wanda,random,corrected_gxo,static_gxo,progressive_gxo --ratios 0.5 --limit 6 --max-tokens 256 --calib-sequences 4 --out $OUT/compare-smol > $OUT/compare-smol.log 2>&1
run bench --model smollm2-135m --ratios 0.5 --modes dense,static,oracle --no-speed --gen-questions 2 --mc1-items 4 --task-items 4 --ppl-tokens 256 --out $OUT/bench-smol > $OUT/bench-smol.log 2>&1 || echo "bench failed"
echo ok
