#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on the device machine and that machine lacks, for its Python, into .whl/
# (ignored by git; the device tool carries it with carry [".whl"]). Its image already has torch, torchvision,
# timm, pillow, fsspec, tqdm, click, regex, safetensors, huggingface_hub, numpy, pyyaml, packaging and
# typing_extensions (/work/.library/device/KINDS.md). Versions are the ones installed here, so the device runs
# what the tests run. Prints the wheels' size against the 64 MiB that may travel (wheels + the working tree).
#
#   bench/gpu_wheels.sh [--python-version 3.12] [--platform TAG]... [--dest .whl] [--faiss-gpu]
#
# --faiss-gpu also tries faiss-gpu-cu12 with the CUDA 12 libraries it loads (the device's image has CUDA 13's):
# on 2026-12-01 its wheel alone was 46 MiB and nvidia-cublas-cu12 several hundred, far over the limit; the
# wheels are removed again when they do not fit, and gpu_check.py then skips its FAISS step.
set -euo pipefail

python_version=3.12  # the device's python3 (KINDS.md: Python 3.12.3)
platforms=()
dest=.whl
faiss_gpu=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) python_version="$2"; shift 2 ;;
        --platform) platforms+=("$2"); shift 2 ;;
        --dest) dest="$2"; shift 2 ;;
        --faiss-gpu) faiss_gpu=1; shift ;;
        *) echo "bench/gpu_wheels.sh: unknown option $1 (see the header of bench/gpu_wheels.sh)" >&2; exit 2 ;;
    esac
done
if [ ${#platforms[@]} -eq 0 ]; then
    platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
               manylinux1_x86_64)
fi

# pyproject.toml's dependencies the image lacks, and what they need in turn (their Requires-Dist)
packages=(open_clip_torch ftfy wcwidth webdataset braceexpand zarr donfig numcodecs google-crc32c)
LIMIT=$((64 * 1024 * 1024))

pinned() {  # NAME==VERSION as installed here
    local version
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) || {
        echo "bench/gpu_wheels.sh: $1 is not installed here: install the project first (pip install -e .)" >&2
        exit 1
    }
    echo "$1==$version"
}

download() {  # wheels for the device's Python and platform, no dependencies resolved (the list names them)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
        "${platforms[@]/#/--platform=}" -d "$dest" "$@"
}

size_of() { du -cb "$@" | tail -1 | cut -f1; }

mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two stop the whole install on the device
specs=()
for name in "${packages[@]}"; do specs+=("$(pinned "$name")"); done
download "${specs[@]}"
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)  # the tracked files travel too
wheels=$(size_of "$dest"/*.whl)
if [ "$faiss_gpu" = 1 ]; then
    before=("$dest"/*.whl)
    if ! download faiss-gpu-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12; then
        echo "faiss-gpu-cu12: no wheels of it or its CUDA 12 libraries for Python $python_version: left out"
    fi
    with_faiss=$(size_of "$dest"/*.whl)
    if [ $((tree + with_faiss)) -gt "$LIMIT" ]; then
        echo "faiss-gpu-cu12 + its CUDA 12 libraries: $((with_faiss - wheels)) bytes, over the limit: left out"
        for f in "$dest"/*.whl; do
            [[ " ${before[*]} " == *" $f "* ]] || rm -f "$f"
        done
    else
        wheels=$with_faiss
    fi
fi
ls -1 "$dest"
echo "wheels $wheels bytes + working tree $tree bytes = $((wheels + tree)) of the $LIMIT bytes (64 MiB) that travel"
if [ $((wheels + tree)) -gt "$LIMIT" ]; then
    echo "bench/gpu_wheels.sh: over the 64 MiB carry limit" >&2
    exit 1
fi
