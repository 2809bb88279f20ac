# the same chunk against the base of run-tq3c.sh: tq and q4_0 caches, TQ keys centred on the mean keys
B=~/.cache/turboquant-llama/build-cpu/bin
M=$(python3 -c "from turboquant_llama.models import model_path; print(model_path('smollm2'))")
KM=$(python3 -c "from turboquant_llama.calibrate import key_means; print(key_means('smollm2'))")
W=$(python3 -c "from turboquant_llama.corpus import wikitext2_test_path; print(wikitext2_test_path())")
common="-m $M -f $W -c 4096 --chunks 1 -b 4096 -ub 512 -fa on -t 2"
for kv in "tq3 tq3" "tq3 tq2" "tq4 tq4" "q4_0 q4_0"; do set -- $kv
  extra=""; [ ${1:0:2} = tq ] && extra="--tq-key-means $KM"
  $B/llama-perplexity $common -ctk $1 -ctv $2 $extra --kl-divergence-base base.kld --kl-divergence > c-$1-$2.log 2>&1
  echo "$1/$2 centred: $(grep -E "Mean +KLD" c-$1-$2.log) $(grep -E "Same top p" c-$1-$2.log) $(grep -E "Mean PPL\(Q\)/PPL" c-$1-$2.log)"
done
