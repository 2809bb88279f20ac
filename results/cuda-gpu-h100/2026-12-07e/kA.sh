# call A (fresh machine): the harness of base and variants
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
bash .dev/s/k1.sh "$@"
echo "harness done at $(el) s"
