# The basic blocks of a kernel's loop in SASS, with their opcode counts (session 20: which parts of the decode
# step cost instructions). Made by hand, run as:
#   printf '#include "tq-cuda.h"\n#include "tq-cuda.cuh"\ntemplate __global__ void tq_fattn_mma_kernel<128, TQK_TQ3, TQK_TQ2>(const tq_fattn_params, const __grid_constant__ tq_cuda_tables);\n' > one.cu
#   nvcc -O3 -std=c++17 -arch=sm_90 -use_fast_math -Iggml_tq -cubin one.cu -o one.cubin && cuobjdump -sass one.cubin > one.sass
#   python3 sass_regions.py one.sass Li44ELi43E <loop start hex> <loop end hex> <min block size>
# (the loop: the backward branch whose body holds the HMMAs; cuobjdump/nvdisasm from the nvidia-cuda-cuobjdump wheel)
import re,sys,collections
txt=open(sys.argv[1]).read()
for part in txt.split('Function :')[1:]:
    name=part.split('\n')[0].strip()
    if sys.argv[2] not in name: continue
    ins=[]
    for l in part.splitlines():
        m=re.match(r'\s*/\*([0-9a-f]{4,})\*/\s+(.*?);',l)
        if m: ins.append((int(m.group(1),16),m.group(2).strip()))
    lo,hi=int(sys.argv[3],16),int(sys.argv[4],16)
    body=[x for x in ins if lo<=x[0]<=hi]
    tg=set()
    for a,t in body:
        for kw in ('BRA','BSSY'):
            if kw in t:
                m=re.search(r'0x([0-9a-f]+)',t.split(kw)[1])
                if m: tg.add(int(m.group(1),16))
    run=[];start=body[0][0]
    def flush():
        global run
        if run and len(run)>=int(sys.argv[5]):
            c=collections.Counter(r.split()[0] for r in run)
            print(f'{start:06x} n={len(run):4d}', ' '.join(f'{k}:{v}' for k,v in c.most_common(9)))
        run=[]
    for a,t in body:
        if a in tg: flush(); start=a
        tt=re.sub(r'^@!?U?P\w+\s+','',t)
        run.append(tt)
        if 'BRA' in t or 'EXIT' in t or 'BSYNC' in t: flush(); start=a+16
    flush()
