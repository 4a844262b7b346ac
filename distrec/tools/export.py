"""``distrec export``: a checkpoint (any training plan, any world size) as a Triton model repository.

    distrec export --checkpoint runs/demo/ckpt --out runs/demo/serve --format both --max-batch-size 65536

writes ``REPO/<name>/1/model.pt`` (TorchScript) and/or ``REPO/<name>_onnx/1/model.onnx`` (ONNX), each with
its ``config.pbtxt``: the inputs ``dense`` [D] FP32 and ``lengths`` [T] INT64 per sample, and ``ids``
INT64, every sample's ids one after another (sample-major; ``allow_ragged_batch``, so the dynamic batcher
concatenates requests), the output ``probability`` [1] FP32; ``max_batch_size``, an ``instance_group``, and
a ``dynamic_batching`` block from --preferred-batch-size and --max-queue-delay-us. The model itself is
``distrec.model.inference.InferenceDLRM`` (fp32).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from distrec.model.inference import MISSING_IDS, InferenceDLRM
from distrec.trainer.checkpoint import CheckpointError, open_latest

FORMATS = ("torchscript", "onnx", "both")
PLATFORMS = {"torchscript": ("pytorch_libtorch", "model.pt"), "onnx": ("onnxruntime_onnx", "model.onnx")}


@dataclass
class TensorSpec:
    name: str
    data_type: str  # Triton's: TYPE_FP32, TYPE_INT64
    dims: list[int]  # without the batch dimension
    ragged: bool = False


def model_io(model: InferenceDLRM, num_dense: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec("dense", "TYPE_FP32", [num_dense]), TensorSpec("lengths", "TYPE_INT64", [len(model.dims)]),
              TensorSpec("ids", "TYPE_INT64", [-1], ragged=True)]
    return inputs, [TensorSpec("probability", "TYPE_FP32", [1])]


def config_pbtxt(name: str, platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int,
                 preferred: list[int], queue_delay_us: int, instances: int) -> str:
    """Triton's model configuration (protobuf text format)."""
    nl = "\n"
    def tensor(t: TensorSpec) -> str:
        ragged = "\n    allow_ragged_batch: true" if t.ragged else ""
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {", ".join(map(str, t.dims))} ]{ragged}\n  }}'
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
            f"input [\n{',{nl}'.join(tensor(t) for t in inputs)}\n]\n"
            f"output [\n{',{nl}'.join(tensor(t) for t in outputs)}\n]\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n")


class Probability(torch.nn.Module):
    """The exported signature: probabilities as [B, 1], Triton's shape for a [1] output per sample."""

    def __init__(self, model: InferenceDLRM):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.model(dense, lengths, ids).unsqueeze(1)


def example_inputs(model: InferenceDLRM, num_dense: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.ones(3, len(model.dims), dtype=torch.int64)
    lengths[0, 0] = 2
    return torch.zeros(3, num_dense), lengths, torch.zeros(int(lengths.sum()), dtype=torch.int64)


def save_torchscript(model: torch.nn.Module, path: Path) -> None:
    torch.jit.save(torch.jit.script(model), str(path))


def save_onnx(model: torch.nn.Module, example, path: Path) -> None:
    batch, ids = torch.export.Dim("batch", min=1), torch.export.Dim("ids", min=0)
    # The exporter prints its stages and warns about ops it does not use: kept out of the command's output.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_log.setLevel(logging.ERROR)
        try:
            torch.onnx.export(model, example, str(path), input_names=["dense", "lengths", "ids"],
                              output_names=["probability"], dynamo=True, verbose=False, external_data=False,
                              dynamic_shapes={"dense": {0: batch}, "lengths": {0: batch}, "ids": {0: ids}})
        finally:
            onnx_log.setLevel(level)


def export(state: dict, out: Path, name: str, formats: list[str], max_batch: int, preferred: list[int],
           queue_delay_us: int, instances: int, missing_ids: str, where: str) -> list[Path]:
    """Write one model folder per format; returns the model files."""
    model = InferenceDLRM.from_checkpoint(state, where, missing_ids)
    num_dense = len(state["config"]["schema"]["dense"] or [])
    inputs, outputs = model_io(model, num_dense)
    wrapped, written = Probability(model).eval(), []
    for fmt in formats:
        if fmt == "onnx" and missing_ids == "error":
            raise ValueError("--missing-ids error needs TorchScript: ONNX has no way to raise; use --missing-ids zero")
        folder = name if fmt == "torchscript" or len(formats) == 1 else f"{name}_onnx"
        platform, filename = PLATFORMS[fmt]
        (out / folder / "1").mkdir(parents=True, exist_ok=True)
        path = out / folder / "1" / filename
        if fmt == "torchscript":
            save_torchscript(wrapped, path)
        else:
            save_onnx(wrapped, example_inputs(model, num_dense), path)
        (out / folder / "config.pbtxt").write_text(
            config_pbtxt(folder, platform, inputs, outputs, max_batch, preferred, queue_delay_us, instances))
        written.append(path)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (its newest step that verifies)")
    p.add_argument("--out", required=True, help="the Triton model repository to write")
    p.add_argument("--name", default="dlrm")
    p.add_argument("--format", choices=FORMATS, default="both")
    p.add_argument("--max-batch-size", type=int, default=65536)
    p.add_argument("--preferred-batch-size", type=int, nargs="+", default=[65536])
    p.add_argument("--max-queue-delay-us", type=int, default=7000)
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--missing-ids", choices=MISSING_IDS, default="zero",
                   help="an id outside its table: a zero row, or an error (TorchScript only)")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise CheckpointError(f"unknown arguments: {' '.join(rest)}")
    ckpt = open_latest(args.checkpoint)
    if ckpt is None:
        raise CheckpointError(f"{args.checkpoint}: no checkpoint")
    if args.max_batch_size < 1 or any(b < 1 or b > args.max_batch_size for b in args.preferred_batch_size):
        raise CheckpointError("--max-batch-size must be >= 1 and every --preferred-batch-size within 1 .. it")
    formats = ["torchscript", "onnx"] if args.format == "both" else [args.format]
    try:
        written = export(ckpt.full_state(), Path(args.out), args.name, formats, args.max_batch_size,
                         args.preferred_batch_size, args.max_queue_delay_us, args.instances, args.missing_ids,
                         str(ckpt.path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for path in written:
        print(f"wrote {path} and {path.parent.parent / 'config.pbtxt'}")
    return 0
