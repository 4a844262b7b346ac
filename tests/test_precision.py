"""train.precision: the config's choices, what the trainer logs and warns on a CPU with and without bf16
instructions, distrec doctor's row, and a bf16 run of the trainer beside fp32 on the same data."""
import json

import pytest

from distrec.config import ConfigError, load_config
from distrec.trainer.precision import cpu_flags, half_line, precision_note
from tests.conftest import run_cli

XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile avx512_fp16\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


def test_cpu_flags_and_doctor_row():
    assert {"amx_bf16", "avx512_bf16", "avx512_fp16"} <= cpu_flags(XEON) and "amx_bf16" not in cpu_flags(EPYC)
    assert half_line(cpu_flags(XEON)) == 'amx_bf16, avx512_bf16, avx512_fp16 (train.precision = "bf16" runs natively)'
    assert half_line(cpu_flags(EPYC)).endswith("(bf16 autocast is emulated here: slower than fp32)")
    assert cpu_flags("") == set()


def test_precision_note_warns_only_where_bf16_is_emulated():
    line, warning = precision_note("bf16", "cpu", cpu_flags(XEON))
    assert line.startswith("precision: bf16 autocast over the bottom MLP") and line.endswith(
        "this CPU has amx_bf16, avx512_bf16") and warning == ""
    line, warning = precision_note("bf16", "cpu", cpu_flags(EPYC))
    assert "emulated and runs slower than fp32" in warning
    assert precision_note("bf16", "cuda", set())[1] == ""
    assert precision_note("fp32", "cpu", set()) == ("precision: fp32", "")


def test_unknown_precisions_and_fp16_under_horovod_are_refused_in_one_line(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[train]\nprecision = \"fp8\"\n")
    with pytest.raises(ConfigError, match=r"train\.precision = 'fp8' is not one of fp32, bf16, fp16"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"tables\.precisions has 'int8', which is not one of fp32, fp16, bf16"):
        load_config(None, ["--schema.preset=none", '--schema.categorical=["a"]', '--tables.precisions=["int8"]'])
    with pytest.raises(ConfigError, match=r"train\.precision = \"fp16\" needs dense\.engine = \"ddp\""):
        load_config(None, ["--train.precision=fp16", "--dense.engine=horovod"])
    with pytest.raises(ConfigError, match=r"plan\.dense_comm_precision = 'bf16' needs dense\.engine = \"ddp\""):
        load_config(None, ["--plan.dense_comm_precision=bf16", "--dense.engine=horovod"])


def test_precision_note_for_fp16_says_what_this_cpu_gains():
    line, warning = precision_note("fp16", "cpu", cpu_flags(XEON))
    assert line.startswith("precision: fp16 autocast over the bottom MLP") and line.endswith("dynamic loss scaling")
    assert "runs about as fast as fp32; bf16 is the fast half type on CPUs" in warning  # no amx_fp16 there
    assert precision_note("fp16", "cpu", {"amx_fp16"})[1] == ""


def test_bf16_trains_two_ranks_beside_fp32(small_data, tmp_path):
    """The same seed, data and steps in fp32 and bf16 on 2 ranks: the run logs its precision, the loss
    falls alike, and the evaluation lands near fp32's (a rank statistic over 2,000 rows)."""
    cfg_path, data = small_data
    final, losses = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrec.train",
                    "--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={out}",
                    "--train.max_steps=40", "--train.global_batch_size=252", f"--train.precision={precision}",
                    "--plan.default=row_wise")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"precision: {precision}" in r.stdout
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        final[precision] = [x for x in recs if x["kind"] == "eval"][-1]
        losses[precision] = [x["loss"] for x in recs if x["kind"] == "train"]
        assert losses[precision][-1] < losses[precision][0]
    assert abs(final["bf16"]["auc"] - final["fp32"]["auc"]) < 0.01, final
    assert losses["bf16"] != losses["fp32"]  # bf16 did run: its rounding moves every loss after the first steps


def test_the_ps_workers_take_the_same_precision(small_data, tmp_path):
    """The async PS's workers build the same DLRM (DLRM.from_config), so train.precision = "bf16" runs
    their dense part in bf16 too and the sync-vs-async comparison stays like for like."""
    cfg_path, data = small_data
    r = run_cli("-m", "distrec", "ps", "--workers", "2", "--servers", "1", "--config", str(cfg_path),
                f"--data.path={data}", f"--logging.dir={tmp_path}", "--train.max_steps=10",
                "--train.global_batch_size=252", "--train.precision=bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "workers' dense part in bf16" in r.stdout and "final: step" in r.stdout


def test_the_ps_workers_scale_an_fp16_loss_and_push_nothing_from_an_overflowing_step(small_data, tmp_path):
    """fp16 on the PS: each worker keeps its own loss scale; a first scale of 2**40 overflows, so the first
    steps push nothing (the servers' version does not move), are counted, and training then goes on."""
    cfg_path, data = small_data
    r = run_cli("-m", "distrec", "ps", "--workers", "2", "--servers", "1", "--config", str(cfg_path),
                f"--data.path={data}", f"--logging.dir={tmp_path}", "--train.max_steps=30",
                "--train.global_batch_size=252", "--train.precision=fp16", f"--train.loss_scale={2.0**40}")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skip = [x for x in recs if x["kind"] == "skip"]
    assert len(skip) == 1 and len(skip[0]["per_worker"]) == 2 and all(n >= 5 for n in skip[0]["per_worker"])
    assert f"fp16: {skip[0]['skipped']} worker step(s) overflowed and pushed nothing" in r.stdout
    assert "final: step" in r.stdout


def test_evaluation_runs_in_the_training_precision_unless_fp32_is_asked_for():
    """eval.precision = "train" (default): eval() keeps bf16 autocast; "fp32": the dense part in fp32 in
    eval() (the logits equal the fp32 model's exactly), while training still runs in bf16."""
    import torch

    from distrec.model.dlrm import DLRM
    from tests.reference_model import LocalEmbeddings
    from tests.test_model import random_batch, specs

    tspecs = specs()
    logits = {}
    for precision, eval_precision in (("fp32", "train"), ("bf16", "train"), ("bf16", "fp32")):
        torch.manual_seed(0)
        model = DLRM(4, LocalEmbeddings(tspecs), [16, 8], [12, 6], precision=precision,
                     eval_precision=eval_precision).eval()
        logits[precision, eval_precision] = model(torch.randn(17, 4, generator=torch.Generator().manual_seed(1)),
                                                  random_batch(tspecs, 17))
        assert model.train().active_precision == precision
    assert torch.equal(logits["bf16", "fp32"], logits["fp32", "train"])
    assert not torch.equal(logits["bf16", "train"], logits["fp32", "train"])
    assert load_config(None, ["--eval.precision=fp32"]).eval.precision == "fp32"
