"""Device presets: every number with its unit and its public source.

    topo = make_topology("h100-80g", world_size=16, nodes=2, hbm_bytes=16e9)
    topo.ranks_per_node        # 8

GPU rows are per GPU of an 8-GPU HGX/DGX node. Link bandwidths are one direction per GPU: NVIDIA quotes
NVLink as the total of both directions, so the per-direction figure is half of it. The efficiency
factors say how much of a peak the real kernels reach; they are assumptions until ``distrec plan
--calibrate`` measures them on the machine at hand (``sharding.planner.calibrate``).
"""
from __future__ import annotations

from types import MappingProxyType

from sharding.planner.types import GB, PlannerError, Topology

# How much of the datasheet peak real kernels reach. Assumptions, replaced by --calibrate:
# - fbgemm's fused TBE lookup/update moves rows at roughly half of HBM peak for 64-256 wide fp32 rows
#   (TorchRec's planner assumes 1.0x for fused kernels, torchrec/distributed/planner/constants.py
#   kernel_bw_lookup, and 0.5x for unfused ones, which is closer to our plain-PyTorch runtime).
GPU_LOOKUP_EFFICIENCY = 0.5
# NCCL all-to-all and all-reduce reach ~70-80 % of link bandwidth for MB-sized messages (nccl-tests
# "busbw" on DGX systems, github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md defines busbw).
GPU_COMM_EFFICIENCY = 0.7
# fp32 MLPs 512-1024 wide at batch 8K reach about half of the fp32 peak (assumption).
GPU_DENSE_EFFICIENCY = 0.5
# NCCL small-message all-to-all latency within a node is tens of microseconds (nccl-tests, assumption).
GPU_COLLECTIVE_LATENCY_S = 30e-6
# Kernel launches and Python per step of a DLRM trainer (assumption: a few hundred launches x ~5 us).
GPU_STEP_OVERHEAD_S = 2e-3

_A100_80G = MappingProxyType(dict(
    hbm_bytes=80 * GB,  # NVIDIA A100 datasheet (nvidia.com, "A100 Tensor Core GPU" datasheet): 80GB HBM2e
    hbm_bw_bytes_per_s=2039 * GB,  # same datasheet, A100 80GB SXM: 2,039 GB/s
    intra_node_bw_bytes_per_s=300 * GB,  # same datasheet: NVLink 600 GB/s (both directions)
    inter_node_bw_bytes_per_s=25 * GB,  # NVIDIA DGX A100 datasheet: 8x ConnectX-6 200 Gb/s HDR, one per GPU
    dense_flops_per_s=19.5e12,  # A100 datasheet: FP32 19.5 TFLOPS
))
_H100_80G = MappingProxyType(dict(
    hbm_bytes=80 * GB,  # NVIDIA H100 datasheet ("H100 Tensor Core GPU"), H100 SXM: 80GB HBM3
    hbm_bw_bytes_per_s=3350 * GB,  # same datasheet, H100 SXM: 3.35 TB/s
    intra_node_bw_bytes_per_s=450 * GB,  # same datasheet: NVLink 900 GB/s (both directions)
    inter_node_bw_bytes_per_s=50 * GB,  # NVIDIA DGX H100 datasheet: 8x ConnectX-7 400 Gb/s, one per GPU
    dense_flops_per_s=67e12,  # H100 datasheet, SXM: FP32 67 TFLOPS
))
_H200 = MappingProxyType(dict(
    hbm_bytes=141 * GB,  # NVIDIA H200 datasheet ("H200 Tensor Core GPU"), H200 SXM: 141GB HBM3e
    hbm_bw_bytes_per_s=4800 * GB,  # same datasheet: 4.8 TB/s
    intra_node_bw_bytes_per_s=450 * GB,  # same datasheet: NVLink 900 GB/s (both directions)
    inter_node_bw_bytes_per_s=50 * GB,  # NVIDIA DGX H200 datasheet: 8x ConnectX-7 400 Gb/s, one per GPU
    dense_flops_per_s=67e12,  # H200 datasheet, SXM: FP32 67 TFLOPS
))
_GPU_FACTORS = MappingProxyType(dict(
    lookup_efficiency=GPU_LOOKUP_EFFICIENCY, comm_efficiency=GPU_COMM_EFFICIENCY, dense_efficiency=GPU_DENSE_EFFICIENCY,
    collective_latency_s=GPU_COLLECTIVE_LATENCY_S, step_overhead_s=GPU_STEP_OVERHEAD_S,
    replica_efficiency=0.0))  # 0: replicas' gradient sync runs at the lookup's rate (assumption)

# This project's CPU machine: 2 vCPUs of an AMD EPYC (Zen 3) under KVM, 24.7 GB RAM, gloo ranks. Measured
# here on 2026-11-23 (no datasheet applies to a VM slice). Rates marked "calibrate" come from
# `distrec plan --calibrate --gpus 2 --config configs/demo.toml --preset cpu` (several runs; the machine is
# shared with other jobs, so they vary by 2x: the value is mid-range); a new --calibrate replaces them.
_CPU = MappingProxyType(dict(
    hbm_bytes=12.6 * GB,  # /proc/meminfo MemTotal 24,683,656 kB, shared by 2 ranks (one per core)
    # torch: b.copy_(a) of 256 MiB fp32, 1 thread, best of 5, (read + write bytes) / s: 14.4 GB/s
    hbm_bw_bytes_per_s=14 * GB,
    intra_node_bw_bytes_per_s=0.8 * GB,  # calibrate: gloo all_to_all_single over loopback, 0.37-1.0 GB/s
    inter_node_bw_bytes_per_s=1.25 * GB,  # assumption: 10 GbE between CPU nodes; no second node to measure
    dense_flops_per_s=66e9,  # torch: 2048 x 2048 fp32 matmul, 1 thread: 66 GFLOP/s
    lookup_efficiency=0.057,  # calibrate: the runtime moves lookup bytes at 0.3-1.2 GB/s (0.8) of 14
    comm_efficiency=1.0,  # intra_node_bw above is already what gloo achieves
    dense_efficiency=0.18,  # calibrate: the demo DLRM's dense step runs at 7-23 GFLOP/s (12) of 66
    collective_latency_s=300e-6,  # calibrate: 0.2-0.8 ms per small all-to-all, 2 ranks
    step_overhead_s=15e-3,  # calibrate: 10-24 ms per step beyond the terms above (Python, DDP, loss)
    replica_efficiency=0.043,  # calibrate: replicas' gradient sync at 0.2-2.2 GB/s (0.6) of 14
))

PRESETS = MappingProxyType({
    "a100-80g": MappingProxyType({**_A100_80G, **_GPU_FACTORS}),
    "h100-80g": MappingProxyType({**_H100_80G, **_GPU_FACTORS}),
    "h200": MappingProxyType({**_H200, **_GPU_FACTORS}),
    "cpu": _CPU,
})


def make_topology(preset: str, world_size: int, nodes: int = 1, **overrides) -> Topology:
    """A preset's numbers with any of them replaced (``overrides`` are ``Topology`` field names)."""
    if preset not in PRESETS:
        raise PlannerError(f"unknown device preset {preset!r}; presets: {', '.join(PRESETS)}")
    fields = dict(PRESETS[preset])
    unknown = sorted(set(overrides) - set(fields) - {"calibrated"})
    if unknown:
        raise PlannerError(f"unknown topology setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Topology(world_size=world_size, nodes=nodes, name=preset, **fields)
