#!/usr/bin/env bash
# Twelfth session, call 1 (nvidia-h100-x1): the WKV GPU tests. First the bit-equality test of both custom-op
# variants on its own (r52/r53 lost the [False] failure's text to the box), twice, to see a flake; then every
# other GPU test of test_wkv6/test_rwkv6 with a box long enough for the three compiled 2-layer tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/t.txt
P="python3 -m pytest -v -rf --tb=short -p no:cacheprovider"
for i in 1 2; do
  timeout -k 5 80 $P tests/test_wkv6.py -k "equal_flas" > $OUT/eq$i.txt 2>&1; echo "eq$i rc $?" >> $OUT/t.txt
  grep -E "PASSED|FAILED|passed|failed|^E " $OUT/eq$i.txt | head -20 >> $OUT/t.txt
done
timeout -k 5 330 $P tests/test_wkv6.py tests/test_rwkv6.py -k "gpu and not equal_flas" > $OUT/gpu.txt 2>&1; echo "gpu rc $?" >> $OUT/t.txt
grep -E "PASSED|FAILED|passed|failed|^E " $OUT/gpu.txt | head -30 >> $OUT/t.txt
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/t.txt
