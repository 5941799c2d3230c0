#!/bin/bash
# run_gemm.sh — one device call: build the harness (sm_90a), check + time it, count SASS instructions. Logs under $OUT.
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
INC=""; LIB="-lcublas"
if [ ! -f /usr/local/cuda/include/cublas_v2.h ]; then
  H=$(python3 -c 'import nvidia,os,glob;print(next(iter(sorted(glob.glob(os.path.join(nvidia.__path__[0],"**","cublas_v2.h"),recursive=True))),""))' 2>/dev/null)
  D=$(dirname "$(dirname "$H")"); L=$(ls $D/lib/libcublas.so* 2>/dev/null | head -1)
  INC="-I$D/include"; LIB="-L$D/lib -l:$(basename $L) -Xlinker -rpath=$D/lib"; echo "cublas from $D"
fi
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -DGEMM_HARNESS gemm_harness.cu $INC $LIB -o /tmp/g > $OUT/compile.log 2>&1 || { tail -30 $OUT/compile.log; exit 1; }
grep -ciE "warn" $OUT/compile.log
cuobjdump -sass /tmp/g > $OUT/g.sass
awk '/Function :/ {f=$3} /HGMMA/ {h[f]++} /HMMA/ {m[f]++} /LDL|STL/ {l[f]++} /UTMALDG/ {t[f]++} END {for (k in h) print "HGMMA", h[k], "UTMALDG", t[k], k; for (k in m) print "HMMA", m[k], k; for (k in l) print "LDL/STL", l[k], k}' $OUT/g.sass | sort | cut -c1-150
timeout ${GEMM_S:-100} /tmp/g 2>&1 | tee $OUT/run.log | grep -v "^shape"
echo "rc=${PIPESTATUS[0]}"
