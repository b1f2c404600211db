#!/usr/bin/env bash
# On the lent H100 (no network): phases of the real flash-attn work, one per call.
#   fa_build.sh setup   — install carried wheels into /tmp/site, print the node's software
#   fa_build.sh start   — start the flash-attn source build detached (survives the call)
#   fa_build.sh status  — is the build done? tail of its log
#   fa_build.sh wait S  — wait up to S seconds for the build to finish
# Results and logs are copied under $OUT.
set -uo pipefail
PHASE=${1:?phase}
BUILD=/tmp/fa-build
SDIST=$(ls "$PWD"/.device/sdist/flash_attn-*.tar.gz | head -1)
export PYTHONPATH=/tmp/site
case "$PHASE" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    which python3 nvcc; nvcc -V | tail -2; nproc; free -g | head -2
    python3 -c "import torch,sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch._C._GLIBCXX_USE_CXX11_ABI, torch.cuda.get_arch_list())"
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|ninja|psutil|einops|packaging|grpcio|protobuf|nvidia-ml-py|setuptools|wheel) "
    ;;
  start)
    mkdir -p $BUILD && cd $BUILD
    cat > run.sh <<EOS
#!/usr/bin/env bash
cd $BUILD
start=\$(date +%s)
export FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=\${FLASH_ATTN_CUDA_ARCHS:-90} MAX_JOBS=\${MAX_JOBS:-16} NVCC_THREADS=\${NVCC_THREADS:-2}
python3 -m pip wheel --no-build-isolation --no-deps --no-index -w $BUILD/dist "$SDIST" > $BUILD/build.log 2>&1
rc=\$?
echo "rc=\$rc seconds=\$((\$(date +%s)-start))" > $BUILD/done
EOS
    chmod +x run.sh; rm -f done
    setsid nohup ./run.sh > /dev/null 2>&1 < /dev/null &
    sleep 5; echo started; tail -3 build.log
    ;;
  status)
    cat $BUILD/done 2>/dev/null || echo "building"; tail -5 $BUILD/build.log; ls -la $BUILD/dist 2>/dev/null
    ;;
  wait)
    for _ in $(seq 1 "${2:-540}"); do [[ -f $BUILD/done ]] && break; sleep 1; done
    cat $BUILD/done 2>/dev/null || echo "still building"; tail -3 $BUILD/build.log; ls -la $BUILD/dist 2>/dev/null
    ;;
esac
