#!/bin/bash
# alternate before/after runs of the CPU bench; OUT keeps each run's table and JSON
OUT=${OUT:-/tmp/ab}; mkdir -p $OUT
for i in $(seq 1 ${ROUNDS:-3}); do
  for side in before after; do
    tree=$AFTER; [ $side = before ] && tree=$BEFORE
    (cd $tree && PYTHONPATH=$tree ${PYTHON:-python} -m fuser_moe bench --device cpu --workloads standard --tokens 512 --hidden 1024 --experts 32 --topk 4 --modes exact --no-fp8 --sweep none --baselines all_to_all_single --out $OUT/${side}_$i --no-plot > $OUT/bench_${side}_$i.txt 2>$OUT/bench_${side}_$i.err)
    echo "== $side $i"; grep -E "^(dispatch|combine)" $OUT/bench_${side}_$i.txt
  done
done
