# SmolLM2 at a 4096-token context: the f16 base of one chunk of WikiText-2, then KLD of tq3c keys (results/tq3c-cache.md)
B=~/.cache/turboquant-llama/build-cpu/bin
M=$(python3 -c "from turboquant_llama.models import model_path; print(model_path('smollm2'))")
F=$(python3 -c "from turboquant_llama.calibrate import tq3c_transforms; print(tq3c_transforms('smollm2'))")
W=$(python3 -c "from turboquant_llama.corpus import wikitext2_test_path; print(wikitext2_test_path())")
common="-m $M -f $W -c 4096 --chunks 1 -b 4096 -ub 512 -fa on -t 2"
[ -f base.kld ] || $B/llama-perplexity $common -ctk f16 -ctv f16 --kl-divergence-base base.kld > base.log 2>&1
for kv in "tq3c tq3" "tq3c tq2"; do set -- $kv
  extra=""; [ $1 = tq3c ] && extra="--tq-key-means $F"
  $B/llama-perplexity $common -ctk $1 -ctv $2 $extra --kl-divergence-base base.kld --kl-divergence > $1-$2.log 2>&1
  echo "$1/$2: $(grep -E "Mean +KLD" $1-$2.log) $(grep -E "Mean PPL\(Q\)" $1-$2.log) $(grep -E "Same top p" $1-$2.log)"
done
