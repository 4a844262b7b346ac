"""`distrec export`: a checkpoint trained on 2 ranks, exported as TorchScript and ONNX, predicts the eval split
as the trainer's own model restored on 1 rank does (resharded on load); the config.pbtxt says the model's
real inputs and outputs; out-of-range ids get the zero row or a named error, never a read outside a table."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from distrec.config import config_from_dict
from distrec.data.loader import make_loader
from distrec.data.manifest import read_manifest
from distrec.model.inference import sample_major
from distrec.trainer.build import build_model
from distrec.trainer.checkpoint import open_latest
from distrec.trainer.dist import DistContext
from distrec.trainer.evaluate import predict
from distrec.trainer.metrics import auc
from distrec.trainer.state import restore
from tests.conftest import run_cli

# Predictions to 1e-5 (the bound): the exported model computes the same fp32 sums in other orders
# (one gather and index_add per table against the sharded kernel's pooling; a sigmoid of the same logit),
# each a few ulps of values below ~10, far under it. AUC to 1e-6: ranks only move when two predictions
# closer than that swap.
PROB_ATOL, AUC_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def exported(small_data, tmp_path_factory):
    """(checkpoint dir, repository) of a 2-rank run exported in both formats."""
    cfg_path, data = small_data
    root = tmp_path_factory.mktemp("export")
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrec.train",
                "--config", str(cfg_path), f"--data.path={data}", "--train.max_steps=12",
                "--train.global_batch_size=252", "--plan.default=row_wise", f"--checkpoint.dir={root / 'ckpt'}",
                f"--logging.dir={root / 'logs'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("-m", "distrec", "export", "--checkpoint", str(root / "ckpt"), "--out", str(root / "repo"),
                "--max-batch-size", "4096", "--preferred-batch-size", "1024", "4096", "--max-queue-delay-us", "500")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "ckpt", root / "repo"


def trainer_predictions(ckpt_dir):
    """The trained model as the trainer builds it, restored on 1 rank: (probabilities, labels, batches)."""
    ckpt = open_latest(ckpt_dir)
    cfg = config_from_dict(ckpt.common["config"], str(ckpt.path))
    ctx = DistContext(0, 1, 0, torch.device("cpu"), "none")
    manifest = read_manifest(cfg.data.path)
    built = build_model(cfg, ctx, manifest)
    restore(ckpt, built.model, built.embeddings, built.optimizers, ctx)
    loader = make_loader(cfg, manifest, cfg.data.eval_split, ctx, train=False)
    probs, labels, _ = predict(built.model, loader, ctx.device)
    return probs.numpy(), labels.numpy(), list(loader.epoch(0))


def exported_predictions(run, batches) -> np.ndarray:
    return np.concatenate([run(b.dense, *sample_major(b.sparse)).reshape(-1) for b in batches])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_exported_model_predicts_as_the_trained_one(exported, fmt):
    ckpt, repo = exported
    want, labels, batches = trainer_predictions(ckpt)
    if fmt == "torchscript":
        model = torch.jit.load(str(repo / "dlrm" / "1" / "model.pt"))
        run = lambda d, length, ids: model(d, length, ids).detach().numpy()  # noqa: E731
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(repo / "dlrm_onnx" / "1" / "model.onnx"))
        run = lambda d, length, ids: session.run(None, {"dense": d.numpy(), "lengths": length.numpy(),  # noqa: E731
                                                         "ids": ids.numpy()})[0]
    got = exported_predictions(run, batches)
    assert got.shape == want.shape == (2000,)
    np.testing.assert_allclose(got, want, rtol=0, atol=PROB_ATOL)
    assert abs(auc(got, labels) - auc(want, labels)) <= AUC_ATOL


def parse_pbtxt(text: str) -> dict:
    """What a Triton server reads from config.pbtxt that this test checks: names, types, dims, sizes."""
    tensors = re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([-\d, ]+) \](\s+allow_ragged_batch: true)?', text)
    return {"name": re.search(r'^name: "(\w+)"', text, re.M)[1], "platform": re.search(r'platform: "(\w+)"', text)[1],
            "max_batch_size": int(re.search(r"max_batch_size: (\d+)", text)[1]),
            "tensors": {n: (t, [int(x) for x in d.split(",")], bool(r)) for n, t, d, r in tensors},
            "preferred": [int(x) for x in re.search(r"preferred_batch_size: \[ ([\d, ]+) \]", text)[1].split(",")],
            "delay": int(re.search(r"max_queue_delay_microseconds: (\d+)", text)[1])}


def test_config_pbtxt_names_the_models_real_inputs_and_outputs(exported):
    ckpt, repo = exported
    _, _, batches = trainer_predictions(ckpt)
    batch = batches[0]
    lengths, ids = sample_major(batch.sparse)
    model = torch.jit.load(str(repo / "dlrm" / "1" / "model.pt"))
    out = model(batch.dense, lengths, ids)
    for folder, platform in (("dlrm", "pytorch_libtorch"), ("dlrm_onnx", "onnxruntime_onnx")):
        cfg = parse_pbtxt((repo / folder / "config.pbtxt").read_text())
        assert (cfg["name"], cfg["platform"], cfg["max_batch_size"]) == (folder, platform, 4096)
        assert (cfg["preferred"], cfg["delay"]) == ([1024, 4096], 500)
        assert cfg["tensors"] == {"dense": ("TYPE_FP32", [batch.dense.shape[1]], False),
                                  "lengths": ("TYPE_INT64", [lengths.shape[1]], False),
                                  "ids": ("TYPE_INT64", [-1], True),
                                  "probability": ("TYPE_FP32", [1], False)}
    assert out.dtype == torch.float32 and tuple(out.shape) == (len(batch), 1)
    assert batch.dense.dtype == torch.float32 and lengths.dtype == ids.dtype == torch.int64


def test_an_out_of_range_id_gets_the_zero_row_or_a_named_error(exported, tmp_path):
    ckpt, repo = exported
    model = torch.jit.load(str(repo / "dlrm" / "1" / "model.pt"))
    dense = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))  # the small config: 3 dense, 4 tables
    lengths = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    bad = ids.clone()
    bad[1] = 10**12  # sample 0, table 1: far outside it
    # The zero row: as if sample 0 had no id in table 1 (sum pooling).
    without = torch.cat([ids[:1], ids[2:]])
    fewer = lengths.clone()
    fewer[0, 1] = 0
    torch.testing.assert_close(model(dense, lengths, bad), model(dense, fewer, without), rtol=0, atol=0)
    r = run_cli("-m", "distrec", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--format",
                "torchscript", "--missing-ids", "error")
    assert r.returncode == 0, r.stderr[-2000:]
    strict = torch.jit.load(str(tmp_path / "dlrm" / "1" / "model.pt"))
    with pytest.raises(Exception, match=r"id 1000000000000 is out of range for table c2 with \d+ rows"):
        strict(dense, lengths, bad)
    r = run_cli("-m", "distrec", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--format",
                "onnx", "--missing-ids", "error")
    assert r.returncode == 2 and "--missing-ids error needs TorchScript" in r.stderr
