# Build the old/new attention harness (h.cu, old.cu: HEAD's headers in old/, new.cu: the worktree's
# ggml_tq/). Rebuilds an object only when its sources are newer: with the objects carried from the
# build machine, this takes seconds. Usage: bash .dev/h/build.sh && .dev/h/h [n_kv ...]
set -e
cd "$(dirname "$0")"
F="-O3 -arch=sm_90 -std=c++17 -use_fast_math"
stale() {   # stale OBJ SRC...: OBJ missing or older than one of SRC
    o=$1; shift
    [ -f "$o" ] || return 0
    for s in "$@"; do [ "$s" -nt "$o" ] && return 0; done
    return 1
}
if stale old.o old.cu kernels.inc old/*.h old/*.cuh; then nvcc $F -Xptxas -v -c old.cu -o old.o 2> ptxas-old.txt & fi
if stale new3.o new.cu kernels.inc ../../ggml_tq/*.h ../../ggml_tq/*.cuh; then nvcc $F -DTQ_MMA_MIN_CTAS=3 -DHNS=new3_tq -DPFX=new3 -Xptxas -v -c new.cu -o new3.o 2> ptxas-new3.txt & fi
if stale new4.o new.cu kernels.inc ../../ggml_tq/*.h ../../ggml_tq/*.cuh; then nvcc $F -DTQ_MMA_MIN_CTAS=4 -DHNS=new4_tq -DPFX=new4 -Xptxas -v -c new.cu -o new4.o 2> ptxas-new4.txt & fi
if stale h.o h.cu ../../ggml_tq/*.h ../../ggml_tq/*.cuh; then nvcc $F -c h.cu -o h.o & fi
wait
if stale h h.o old.o new3.o new4.o; then nvcc -arch=sm_90 h.o old.o new3.o new4.o -o h; fi
