# GPU image for distrec: CUDA torch, fbgemm-gpu and torchrec from one release train, Horovod built
# against that torch, distrec from this checkout.
#
#   docker build -t distrec:cu126 .
#   docker run --rm --gpus all distrec:cu126 distrec doctor
#   docker run --rm --gpus all --ipc=host -v $PWD/runs:/opt/distrec/runs distrec:cu126 \
#       launch/torchrun.sh 8 configs/demo.toml --data.path=runs/demo/data
#
# The devel image is needed to build Horovod: nvcc for its CUDA kernels, and libnccl-dev, which NVIDIA
# ships in it pinned to the image's CUDA version.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

# These three move together; each fbgemm-gpu release loads on one torch minor only (see
# distrec/tools/doctor.py). torchrec 1.8.0 was released for torch==2.13.0 + fbgemm-gpu==1.8.0 with CUDA 12.6
# and 13.0 builds (pytorch/test-infra#8517); the same minors as the CPU set in constraints.txt.
ARG CUDA_TAG=cu126
ARG TORCH_VERSION=2.13.0
ARG FBGEMM_VERSION=1.8.0
ARG TORCHREC_VERSION=1.8.0
ARG HOROVOD_VERSION=0.28.1
# Compute capabilities Horovod's kernels are built for (V100 .. H100); all that nvcc knows is slow.
ARG HOROVOD_BUILD_CUDA_CC_LIST=70,75,80,86,89,90

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv build-essential cmake ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && test -f /usr/include/nccl.h \
    && python3.11 -m venv ${VIRTUAL_ENV} \
    && pip install --upgrade pip setuptools wheel

# torch and fbgemm-gpu from the same CUDA index in one resolve, so pip cannot pair a CUDA fbgemm-gpu
# with a torch from PyPI built for another CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/${CUDA_TAG} \
        torch==${TORCH_VERSION} fbgemm-gpu==${FBGEMM_VERSION}

# --no-deps: torchrec's metadata would pull fbgemm-gpu from PyPI over the one above. Its own
# dependencies come next, pinned by constraints.txt (whose torch==2.13.0 the +cu126 build satisfies).
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-deps torchrec==${TORCHREC_VERSION} \
    && pip install -c /tmp/constraints.txt \
        tensordict torchmetrics==1.0.3 tqdm pyre-extensions numpy pyarrow tomli-w

# Horovod 0.28.1 asks for C++14, but torch >= 2.1 headers need C++17 (horovod/horovod#3941); its fix
# is not in a release, so patch the sdist. torch 2.14 raises the floor to C++20 (pytorch/pytorch#178150):
# moving past torch 2.13 means 20 here. --no-build-isolation: the build must see the torch above, and
# horovod's setup.py imports horovod, which needs its runtime dependencies already installed.
RUN pip install cloudpickle psutil pyyaml packaging \
    && mkdir /tmp/horovod && cd /tmp/horovod \
    && pip download --no-deps --no-binary :all: --no-build-isolation horovod==${HOROVOD_VERSION} \
    && tar xzf horovod-${HOROVOD_VERSION}.tar.gz \
    && cd horovod-${HOROVOD_VERSION} \
    && sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        CMakeLists.txt horovod/torch/CMakeLists.txt \
    && grep -q 'set(CMAKE_CXX_STANDARD 17)' CMakeLists.txt \
    && grep -q 'set(CMAKE_CXX_STANDARD 17)' horovod/torch/CMakeLists.txt \
    && HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
       HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
       HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST} \
       pip install --no-build-isolation --no-deps . \
    && cd / && rm -rf /tmp/horovod \
    && horovodrun --check-build

# The checkout stays in the image as the working directory, so launch/ and configs/ resolve from it.
WORKDIR /opt/distrec
COPY . .
# --no-build-isolation: setup.py builds distrec's C++ CPU kernel against the torch installed above.
RUN pip install --no-deps --no-build-isolation . && pip install -c /tmp/constraints.txt numpy pyarrow tomli-w matplotlib  # matplotlib: distrec bench plots

# Exits 1 on a known-bad version set, a package that fails to load, or the CUDA fbgemm-gpu with no GPU
# visible (a container started without --gpus).
HEALTHCHECK --interval=5m --timeout=2m --start-period=1m CMD distrec doctor
CMD ["distrec", "doctor"]
