"""Bad input and faults: damaged or tampered checkpoints, unusable folders, two runs in one folder,
shape mismatches, the loader at exit, reshard's refusals. Each error is one line naming what is wrong."""
import json
import re
import threading

import pytest
import torch

from distrec.data.loader import READER_THREAD, _background
from distrec.train import main
from distrec.trainer import checkpoint as ckpt
from distrec.trainer.dist import DistContext
from distrec.trainer.locks import LOCK_FILE, lock_run_dirs, release
from tests.conftest import run_cli


def train(small_data, tmp_path, capsys, *more):
    """(exit code, stdout, stderr) of one in-process training with checkpoints every 5 steps."""
    cfg_path, data = small_data
    code = main(["--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={tmp_path / 'logs'}",
                 f"--checkpoint.dir={tmp_path / 'ckpt'}", "--checkpoint.every_steps=5", "--checkpoint.keep=3",
                 "--eval.max_rows=200", *more])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("distrec.train: error: "), err
    return lines[0]


@pytest.mark.parametrize("damage", ["truncate rank_0.pt", "truncate common.pt", "delete index.json"])
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(small_data, tmp_path, capsys, damage):
    assert train(small_data, tmp_path, capsys, "--train.max_steps=10")[0] == 0
    how, name = damage.split()
    victim = tmp_path / "ckpt" / "step_10" / name
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[:200])
    else:
        victim.unlink()
    code, out, _ = train(small_data, tmp_path, capsys, "--train.max_steps=12", "--checkpoint.resume=true")
    assert code == 0
    assert f"checkpoint step_10 passed over: {victim}" in out
    assert "resumed from" in out and "at step 5" in out


def test_index_records_size_and_checksum_of_every_file(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, capsys, "--train.max_steps=5")[0] == 0
    step = tmp_path / "ckpt" / "step_5"
    files = json.loads((step / "index.json").read_text())["files"]
    assert sorted(files) == ["common.pt", "rank_0.pt"]
    assert all(files[n]["size"] == (step / n).stat().st_size for n in files)
    data = bytearray((step / "rank_0.pt").read_bytes())
    data[-30] ^= 0xFF  # same size, one byte flipped: only the checksum sees it
    (step / "rank_0.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="rank_0.pt: contents differ from the checksum"):
        ckpt.verify(step)


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears only if the loader runs pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _tamper(step, name, marker):
    """Add a pickled callable to ``name`` and fix up index.json, as someone with write access would."""
    state = torch.load(step / name, weights_only=True)
    state["payload"] = _WritesMarker(marker)
    torch.save(state, step / name)
    index = json.loads((step / "index.json").read_text())
    data = (step / name).read_bytes()
    import hashlib
    index["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["common.pt", "rank_0.pt"])
def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_nothing_runs(small_data, tmp_path, capsys, name):
    assert train(small_data, tmp_path, capsys, "--train.max_steps=5")[0] == 0
    marker = tmp_path / "marker"
    _tamper(tmp_path / "ckpt" / "step_5", name, marker)
    code, out, err = train(small_data, tmp_path, capsys, "--train.max_steps=6", "--checkpoint.resume=true")
    refused = f"{tmp_path / 'ckpt' / 'step_5' / name}: refused: it holds more than tensors and plain data"
    if name == "common.pt":  # found while choosing the step: passed over, and said so
        assert code == 0 and refused in out and "holds no usable checkpoint: starting at step 0" in out
    else:  # found while reading the shards
        assert code == 2 and refused in one_error_line(err)
    assert not marker.exists()


def test_resuming_another_model_shape_names_the_parameter_and_both_shapes(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, capsys, "--train.max_steps=5")[0] == 0
    code, _, err = train(small_data, tmp_path, capsys, "--train.max_steps=6", "--checkpoint.resume=true",
                         "--tables.dim=4", "--model.bottom_mlp=[16, 4]")
    assert code == 2
    assert "bottom.2.weight is (8, 16) there, (4, 16) in this model" in one_error_line(err)
    code, _, err = train(small_data, tmp_path, capsys, "--train.max_steps=6", "--checkpoint.resume=true",
                         "--tables.cardinalities=[60, 200, 7, 300]")
    assert code == 2 and "table c1 is 50 x 8 there, 60 x 8 in this model" in one_error_line(err)


def test_an_unwritable_checkpoint_folder_fails_before_step_one(small_data, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    code, out, err = train(small_data, tmp_path, capsys, "--train.max_steps=5",
                           f"--checkpoint.dir={tmp_path / 'file' / 'ckpt'}")
    assert code == 2 and f"checkpoint.dir {tmp_path / 'file' / 'ckpt'} is not writable" in one_error_line(err)
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()  # no step was trained


def test_resume_with_no_checkpoint_says_so(small_data, tmp_path, capsys):
    code, out, _ = train(small_data, tmp_path, capsys, "--train.max_steps=2", "--checkpoint.resume=true")
    assert code == 0 and "holds no usable checkpoint: starting at step 0" in out


def test_a_second_run_in_the_same_folders_is_refused_naming_the_holder(small_data, tmp_path, capsys):
    held = lock_run_dirs([str(tmp_path / "logs")], DistContext(0, 1, 0, torch.device("cpu"), "none"))
    try:
        code, _, err = train(small_data, tmp_path, capsys, "--train.max_steps=2")
    finally:
        release(held)
    assert code == 2
    line = one_error_line(err)
    assert f"{tmp_path / 'logs'} is in use by another run (pid " in line


def test_a_lock_file_left_by_a_dead_run_does_not_block(small_data, tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / LOCK_FILE).write_text("pid 999999 on a-dead-host\n")  # nobody holds its flock
    assert train(small_data, tmp_path, capsys, "--train.max_steps=2")[0] == 0


def test_a_rerun_without_resume_keeps_the_old_metrics_and_starts_a_fresh_file(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, capsys, "--train.max_steps=3")[0] == 0
    code, out, _ = train(small_data, tmp_path, capsys, "--train.max_steps=2")
    logs = tmp_path / "logs"
    steps = lambda f: [r["step"] for r in map(json.loads, f.read_text().splitlines()) if r["kind"] == "train"]
    assert code == 0 and f"kept as {logs / 'metrics.1.jsonl'}" in out
    assert steps(logs / "metrics.1.jsonl") == [1, 2, 3] and steps(logs / "metrics.jsonl") == [1, 2]


def _reader_threads():
    return [t for t in threading.enumerate() if t.name == READER_THREAD and t.is_alive()]


def test_the_reader_ends_when_training_stops_with_a_full_prefetch_queue():
    """3 items, 2 ahead: after the first is taken the reader fills the queue with the other two and then
    has only the end marker to queue, into a full queue nobody drains any more."""
    produced = threading.Event()

    def items():
        yield from (0, 1, 2)
        produced.set()

    batches = _background(items(), depth=2)
    assert next(batches) == 0
    assert produced.wait(10)
    batches.close()  # the trainer stops here (max_steps reached)
    assert _reader_threads() == []


def test_reshard_refuses_to_write_into_its_source_and_absurd_world_sizes(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, capsys, "--train.max_steps=5")[0] == 0
    src = tmp_path / "ckpt"
    for out, world, said in [(src, 2, "is the checkpoint being read"), (src / "inner", 2, "is the checkpoint being read"),
                             (tmp_path / "c5000", 5000, "more ranks than the largest table has rows (300)")]:
        r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(src), "--out", str(out), "--world-size", str(world))
        assert r.returncode == 2 and said in r.stderr.strip().splitlines()[-1], r.stderr
    assert [p.name for p in ckpt.list_checkpoints(src)] == ["step_5"]


BAD_FILE, BAD_GROUP, BAD_GROUP_ROWS = "part-00001.parquet", 5, 250


def data_with_a_bad_id(data, tmp_path):
    """A copy of the data whose train/part-00001.parquet, rewritten in row groups of 250 rows (the others
    have 500), holds one c4 id of 300 (c4 has 300 rows) in row group 5. The manifest is unchanged, so
    only the loaded batch can tell."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad_data"
    shutil.copytree(data, bad)
    path = bad / "train" / BAD_FILE
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_rows == 2500 and pf.metadata.row_group(0).num_rows == 500  # as SMALL_TOML makes it
    table = pf.read()
    c4 = table["c4"].to_numpy().copy()
    c4[BAD_GROUP * BAD_GROUP_ROWS + 7] = 300
    pq.write_table(table.set_column(table.schema.get_field_index("c4"), "c4", pa.array(c4)), path,
                   row_group_size=BAD_GROUP_ROWS)
    return bad, f"{path} row group {BAD_GROUP}"


def test_an_id_beyond_its_table_names_the_file_and_row_group(small_data, tmp_path, capsys):
    bad, where = data_with_a_bad_id(small_data[1], tmp_path)
    # Batches of 250 rows tile the groups of 250 and 500 rows: the bad batch holds no other group's rows.
    code, _, err = train((small_data[0], bad), tmp_path, capsys, "--train.global_batch_size=250",
                         "--train.epochs=1")
    assert code == 2
    assert one_error_line(err) == ("distrec.train: error: rank 0: feature c4: id 300 is out of range for table c4 "
                                   f"with 300 rows in {where}")


@pytest.mark.parametrize("pipeline", ["false", "true"])
def test_an_id_beyond_its_table_on_one_rank_is_named_with_its_file_on_every_rank(small_data, tmp_path, pipeline):
    """Batches of 500 on 2 ranks: each rank's 250 rows are one group (or half of one), never the other
    rank's, so the rank without the bad row can name its file and group only if the bad rank sent them."""
    bad, where = data_with_a_bad_id(small_data[1], tmp_path)
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrec.train",
                "--config", str(small_data[0]), f"--data.path={bad}", f"--logging.dir={tmp_path / 'logs'}",
                f"--checkpoint.dir={tmp_path / 'ckpt'}",
                f"--train.pipeline={pipeline}", "--train.global_batch_size=500", "--train.epochs=1")
    assert r.returncode != 0
    errors = sorted(line for line in r.stderr.splitlines() if line.startswith("distrec.train: error: "))
    assert [line[:len("distrec.train: error: [rank 0]")] for line in errors] == \
        [f"distrec.train: error: [rank {rank}]" for rank in (0, 1)], r.stderr[-3000:]
    said = {line.split("] ", 1)[1] for line in errors}  # the same message on both ranks, naming the bad one
    assert len(said) == 1 and re.fullmatch(rf"rank [01]: feature c4: id 300 is out of range for table c4 "
                                           rf"with 300 rows in {re.escape(where)}", said.pop()), errors
