#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (its last release, source only) into a venv, against the venv's torch,
# with Gloo and without MPI/TensorFlow/MXNet. The wheel is cached outside the repository, so a second run
# installs in seconds instead of building for ~6 minutes on 2 cores.
#   launch/install_horovod.sh [.venv]
# 0.28.1 asks for C++14, which current torch headers refuse; the build raises it to C++17.
set -euo pipefail

venv=${1:-.venv}
py="$venv/bin/python"
constraints="$(cd "$(dirname "$0")/.." && pwd)/constraints.txt"
version=0.28.1
cache=${DISTREC_WHEEL_CACHE:-$HOME/.cache/distrec/wheels}
torch_version=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
wheel_dir="$cache/horovod-$version-torch$torch_version"

if "$py" -c 'import horovod.torch' 2>/dev/null; then
    echo "horovod already installed in $venv"
    exit 0
fi
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "$py" -m pip download -q --no-deps --no-binary :all: "horovod==$version" -d "$build"
    tar -xzf "$build"/horovod-$version.tar.gz -C "$build"
    src="$build/horovod-$version"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" \
        "$src/horovod/torch/CMakeLists.txt"
    "$py" -m pip install -q -c "$constraints" cmake
    mkdir -p "$wheel_dir"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
        "$py" -m pip wheel -q --no-deps --no-build-isolation "$src" -w "$wheel_dir"
fi
"$py" -m pip install -q --no-deps "$wheel_dir"/horovod-*.whl
"$py" -m pip install -q -c "$constraints" cloudpickle psutil pyyaml packaging  # horovod's runtime deps (horovodrun)
"$py" -c 'import horovod.torch as hvd; print("horovod", hvd.__version__ if hasattr(hvd, "__version__") else "ok")'
