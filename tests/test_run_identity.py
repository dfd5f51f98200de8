"""Run identity (no Ray needed): the first start stores config and split, reruns resume or are refused."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from artifact_core import run_identity
from artifact_core.config import TrainConfig
from artifact_core.run_identity import RUN_FILE, SPLIT_JSON, SPLIT_PARQUET, RunConflictError
from artifact_core.trainer import prepare_run
from conftest import held_run, make_easy_folder, write_image


def cfg(data: Path, storage: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data), storage_path=str(storage), name="r", weights="none", image_size=32,
                head_epochs=1, finetune_epochs=1, val_fraction=0.25)
    base.update(kw)
    return TrainConfig(**base)


def names(split: dict, part: str) -> list[str]:
    return [Path(p).name for p in split[f"{part}_paths"]]


def test_first_start_stores_split_and_rerun_keeps_it_when_files_are_added(tmp_path, caplog):
    data = make_easy_folder(tmp_path / "train", n=24)
    first = held_run(cfg(data, tmp_path / "runs"))  # it trains
    run = tmp_path / "runs" / "r"
    record = json.loads((run / RUN_FILE).read_text())
    assert record["identity"]["image_size"] == 32 and record["data"]["files"] == 24
    stored = json.loads((run / SPLIT_JSON).read_text())
    assert sorted(stored["train"]["files"]) == sorted(names(first["split"], "train"))

    for i in range(100, 112):  # new files would change a recomputed split
        write_image(data / f"image_{i}_{i % 2}.png")
    with caplog.at_level(logging.INFO, logger="artifact_core.run_identity"):
        again = prepare_run(cfg(data, tmp_path / "runs", num_workers=1, max_failures=3, finetune_epochs=2))
    assert again["split"] == first["split"], "a rerun must train on the stored split"
    assert "12 file(s) were added" in caplog.text and "ignored" in caplog.text
    # Nothing recorded until the rerun trains (its workers fit): one that fails before, with
    # raised epochs, leaves a record the original command still resumes.
    assert json.loads((run / RUN_FILE).read_text())["config"]["finetune_epochs"] == 1
    prepare_run(cfg(data, tmp_path / "runs"))
    run_identity.hold_run(again["run_folder"], again["holder"], again["record_config"], claim=again["claim"])
    record = json.loads((run / RUN_FILE).read_text())
    assert record["config"]["finetune_epochs"] == 2 and record["history"][-1]["changed"]["finetune_epochs"] == [1, 2]
    assert [list(h)[0] for h in record["history"]] == ["started", "resumed"]
    with pytest.raises(RunConflictError, match="finetune_epochs: 2 before, 1 now"):
        prepare_run(cfg(data, tmp_path / "runs"))


@pytest.mark.parametrize("change, named", [
    ({"image_size": 64}, "image_size: 32 before, 64 now"),
    ({"lr": 1e-2}, "lr: "),
    ({"head_epochs": 0, "finetune_epochs": 2}, "head_epochs: 1 before, 0 now"),
    ({"test_time_flip": False}, "test_time_flip: True before, False now"),
    ({"head_members": 2}, "head_members: 5 before, 2 now"),
])
def test_rerun_with_other_training_flags_is_refused_naming_them(tmp_path, change, named):
    data = make_easy_folder(tmp_path / "train", n=16)
    held_run(cfg(data, tmp_path / "runs"))
    with pytest.raises(RunConflictError) as err:
        prepare_run(cfg(data, tmp_path / "runs", **change))
    msg = str(err.value)
    assert named in msg and "--name" in msg and "--overwrite" in msg and "\n" not in msg


def test_rerun_with_other_data_is_refused(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    prepare_run(cfg(data, tmp_path / "runs"))
    other = make_easy_folder(tmp_path / "other", n=16)
    with pytest.raises(RunConflictError, match="data_dir: .*train.* before, .*other.* now"):
        prepare_run(cfg(other, tmp_path / "runs"))
    (data / "image_3_1.png").unlink()
    with pytest.raises(RunConflictError, match=r"1 file\(s\) of run .* are no longer in .*image_3_1.png"):
        prepare_run(cfg(data, tmp_path / "runs"))


def test_overwrite_deletes_only_what_runs_wrote(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    prepare_run(cfg(data, tmp_path / "runs"))
    run = tmp_path / "runs" / "r"
    (run / "checkpoint_2026-11-29_10-00-00.000000").mkdir()
    (run / "checkpoint_2026-11-29_10-00-00.000000" / "model.pt").write_bytes(b"w")
    (run / "model").mkdir()
    (run / "notes.txt").write_text("mine")
    loop = prepare_run(cfg(data, tmp_path / "runs", image_size=64, overwrite=True))
    assert sorted(p.name for p in run.iterdir()) == sorted([RUN_FILE, "notes.txt", SPLIT_JSON])
    assert json.loads((run / RUN_FILE).read_text())["identity"]["image_size"] == 64
    assert loop["train"]["overwrite"] is False  # the workers and the bundle never see it


def test_an_overwrite_killed_part_way_leaves_a_folder_overwrite_accepts(tmp_path, monkeypatch):
    """Ray's checkpoint list goes first (no list naming deleted checkpoints) and the record last
    (the folder stays a run's): after a kill at any deletion, --overwrite starts the run again."""
    from artifact_core.storage import Location

    data = make_easy_folder(tmp_path / "train", n=16)
    run = tmp_path / "runs" / "r"
    real_remove = Location.remove
    for kill_after in range(6):
        prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
        for name in ("checkpoint_000001", "checkpoint_000002", "model"):
            (run / name).mkdir()
        (run / "checkpoint_manager_snapshot.json").write_text("{}")
        (run / "notes.txt").write_text("mine")  # a user's file: the folder is never a bare start
        order, left = [], [kill_after]

        def remove(loc, *args, **kwargs):
            if not left[0]:
                raise KeyboardInterrupt
            left[0] -= 1
            order.append(os.path.basename(loc.path))
            return real_remove(loc, *args, **kwargs)
        monkeypatch.setattr(Location, "remove", remove)
        with pytest.raises(KeyboardInterrupt):
            prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
        monkeypatch.setattr(Location, "remove", real_remove)
        assert (run / RUN_FILE).exists()
        assert not order or order[0] == "checkpoint_manager_snapshot.json"
        prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
        assert sorted(p.name for p in run.iterdir()) == sorted([RUN_FILE, "notes.txt", SPLIT_JSON])
    # Killed while it draws the new split (a large folder takes a while): nothing is deleted yet.
    (run / "checkpoint_000001").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("artifact_core.trainer.stratified_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
    assert (run / RUN_FILE).exists() and (run / "checkpoint_000001").is_dir()


def test_folders_that_are_not_runs_are_left_alone(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    foreign = tmp_path / "runs" / "r"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("keep")
    with pytest.raises(RunConflictError, match="not a run of this project"):
        prepare_run(cfg(data, tmp_path / "runs"))
    with pytest.raises(RunConflictError, match="--overwrite refused.*nothing was deleted"):
        prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    # a run folder from before runs stored their split: resuming could mix data
    legacy = tmp_path / "old" / "r"
    legacy.mkdir(parents=True)
    TrainConfig(data_dir=str(data)).save(str(legacy / RUN_FILE))
    with pytest.raises(RunConflictError, match="before runs stored their split"):
        prepare_run(cfg(data, tmp_path / "old"))
    prepare_run(cfg(data, tmp_path / "old", overwrite=True))
    assert (legacy / SPLIT_JSON).exists()


def test_large_split_goes_to_parquet_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setattr(run_identity, "SPLIT_JSON_MAX_FILES", 10)
    data = make_easy_folder(tmp_path / "train", n=16)
    first = prepare_run(cfg(data, tmp_path / "runs"))
    run = tmp_path / "runs" / "r"
    assert (run / SPLIT_PARQUET).exists() and not (run / SPLIT_JSON).exists()
    assert prepare_run(cfg(data, tmp_path / "runs"))["split"] == first["split"]


def test_sweep_identity_ignores_sampled_rates_but_not_the_space(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    space = {"search_space": {"lrs": [1e-2]}}
    prepare_run(cfg(data, tmp_path / "runs"), kind="sweep", extra_identity=space)
    prepare_run(cfg(data, tmp_path / "runs", lr=5e-2), kind="sweep", extra_identity=space)
    with pytest.raises(RunConflictError, match="search_space"):
        prepare_run(cfg(data, tmp_path / "runs"), kind="sweep", extra_identity={"search_space": {"lrs": [2e-2]}})
    with pytest.raises(RunConflictError, match="kind: 'sweep' before, 'train' now"):
        prepare_run(cfg(data, tmp_path / "runs"), extra_identity=space)


def test_sweep_identity_holds_the_selection_metric_and_old_sweeps_compare_with_their_config(tmp_path):
    from artifact_core.config import SweepConfig
    from artifact_core.tuning import _search_space_identity

    data = make_easy_folder(tmp_path / "train", n=16)
    ap = cfg(data, tmp_path / "runs")
    prepare_run(ap, kind="sweep", extra_identity=_search_space_identity(SweepConfig(base=ap)))
    f1 = cfg(data, tmp_path / "runs", select_metric="val_micro_f1")
    with pytest.raises(RunConflictError, match="select_metric: 'val_ap_artifact' before, 'val_micro_f1' now"):
        prepare_run(f1, kind="sweep", extra_identity=_search_space_identity(SweepConfig(base=f1)))
    # a sweep recorded before the metric was part of its identity: its config says which it used
    old = tmp_path / "old"
    legacy = _search_space_identity(SweepConfig(base=cfg(data, old)))
    legacy.pop("select_metric")
    prepare_run(cfg(data, old), kind="sweep", extra_identity=legacy)
    again = cfg(data, old)
    prepare_run(again, kind="sweep", extra_identity=_search_space_identity(SweepConfig(base=again)))


def test_runs_recorded_before_a_field_existed_compare_with_its_old_meaning():
    from artifact_core.run_identity import differences, identity_of

    base = {"data_dir": "/d", "image_size": 224, "lr": 3e-3, "oversample": 0.0}
    old_identity = identity_of(base)
    for key in ("head", "head_cache_views", "oversample", "finetune_schedule", "finetune_bn", "test_time_flip",
                "head_members", "head_cache_augment"):
        old_identity.pop(key, None)
    old = {"identity": old_identity, "kind": "train", "config": dict(base)}
    # (the flip flag and the member count do nothing to the global head: the same run either way)
    same_as_then = {**base, "head": "global", "head_cache_views": 0, "finetune_schedule": "constant",
                    "finetune_bn": "batch", "test_time_flip": True, "head_members": 5, "head_cache_augment": True}
    assert differences(old, {"identity": identity_of(same_as_then), "kind": "train", "config": same_as_then}) == []
    now = {**base, "head": "multiscale", "head_cache_views": 2, "finetune_schedule": "cosine", "finetune_bn": "frozen",
           "test_time_flip": True, "head_members": 5, "head_cache_augment": False}
    assert differences(old, {"identity": identity_of(now), "kind": "train", "config": now}) == [
        "finetune_bn: 'batch' before, 'frozen' now", "finetune_schedule: 'constant' before, 'cosine' now", "head: 'global' before, 'multiscale' now",
        "head_cache_augment: True before, False now", "head_cache_views: 0 before, 2 now", "head_members: 1 before, 5 now", "test_time_flip: False before, True now"]


def test_run_names_and_uris_that_would_land_in_another_folder_are_refused(tmp_path):
    from artifact_core.storage import resolve

    # Under object storage the name is written into URIs that are parsed again: '#' would cut
    # 'exp#2' to 'exp' (two runs, one bundle folder), a space does not parse at all.
    for name in ("exp#2", "lr 1e-3", "50%", "a?b", "café"):
        with pytest.raises(ValueError, match="--name must be one folder name"):
            TrainConfig(name=name, storage_path="s3://bucket/runs").validate()
        TrainConfig(name=name, storage_path=str(tmp_path)).validate()  # a local folder takes them
    for name in ("a/b", "..", "tab\there"):
        with pytest.raises(ValueError, match="--name must be one folder name"):
            TrainConfig(name=name, storage_path=str(tmp_path)).validate()
    TrainConfig(name="lr=1e-3,depth:6@v2", storage_path="s3://bucket/runs").validate()
    with pytest.raises(ValueError, match=r"an? s3:// URI cannot contain '#' .* %23"):
        resolve("s3://bucket/preds#2")
    with pytest.raises(ValueError) as err:  # a '#' in a password: nothing of it is echoed
        resolve("s3://minio:pa#ss@bucket/runs")
    assert "pa" not in str(err.value).replace("path", "") and "ss@" not in str(err.value)
    assert resolve("s3://bucket/a%23b?endpoint_override=127.0.0.1:1&scheme=http").path == "bucket/a#b"


@pytest.mark.parametrize("left", [[SPLIT_JSON], [SPLIT_JSON, f"{RUN_FILE}.tmp4242"], [f"{SPLIT_PARQUET}.tmp17"]])
def test_a_first_start_killed_before_its_record_starts_again(tmp_path, monkeypatch, caplog, left):
    """Killed between the split and the record: a rerun, and --overwrite, clear what it left and start."""
    data = make_easy_folder(tmp_path / "train", n=16)
    run = tmp_path / "runs" / "r"

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between split and record")

    monkeypatch.setattr(run_identity, "write_record", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_run(cfg(data, tmp_path / "runs"))
    monkeypatch.undo()
    split = (run / SPLIT_JSON).read_text()  # (written whole, through a temporary file)

    def leave():
        for name in os.listdir(run):
            os.remove(run / name)
        for name in left:
            (run / name).write_text(split if name == SPLIT_JSON else "{")  # (a temporary file is half written)

    leave()
    for overwrite in (False, True):
        with caplog.at_level(logging.WARNING, logger="artifact_core.run_identity"):
            prepare_run(cfg(data, tmp_path / "runs", overwrite=overwrite))
        assert "first start was interrupted" in caplog.text
        assert sorted(os.listdir(run)) == [RUN_FILE, SPLIT_JSON]
        leave()
        caplog.clear()


@pytest.mark.parametrize("content", ["{}", json.dumps({"root": "/elsewhere", "train": {"files": [], "labels": []},
                                                        "val": {"files": [], "labels": []}})])
def test_a_users_own_split_file_is_not_taken_for_an_interrupted_start(tmp_path, content):
    data = make_easy_folder(tmp_path / "train", n=16)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / SPLIT_JSON).write_text(content)
    for overwrite in (False, True):
        with pytest.raises(RunConflictError, match="nothing was deleted|not a run of this project"):
            prepare_run(cfg(data, tmp_path / "runs", overwrite=overwrite))
    assert (run / SPLIT_JSON).read_text() == content


def test_overwrite_refuses_a_run_record_another_tool_wrote(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    run = tmp_path / "runs" / "r"
    (run / "model").mkdir(parents=True)
    (run / RUN_FILE).write_text(json.dumps({"writer": "some other tool", "lr": 0.1}))
    (run / "results.csv").write_text("theirs")
    with pytest.raises(RunConflictError, match="not written by this project.*nothing was deleted"):
        prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
    assert sorted(os.listdir(run)) == sorted([RUN_FILE, "model", "results.csv"])


def test_an_interrupted_start_beside_other_files_is_not_cleared(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / SPLIT_JSON).write_text("{}")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    for overwrite in (False, True):
        with pytest.raises(RunConflictError, match="nothing was deleted|not a run of this project"):
            prepare_run(cfg(data, tmp_path / "runs", overwrite=overwrite))
    assert sorted(os.listdir(run)) == sorted([SPLIT_JSON, "notes.txt", "checkpoint_2026-01-01_00-00-00.000000"])


def test_auto_image_size_of_a_rerun_ignores_files_added_since(tmp_path):
    """--image-size auto samples the run's stored split on a rerun: added (larger) files do not
    change the size, so the rerun resumes instead of being refused as another experiment."""
    data = tmp_path / "faces"
    for i in range(20):
        write_image(data / f"img_{i:03d}_{int(i % 4 != 0)}.png", size=256)
    first = cfg(data, tmp_path / "runs", image_size="auto", head="global")
    prepare_run(first)
    assert first.image_size == 256
    for i in range(40):
        write_image(data / f"added_{i:03d}_{int(i % 4 != 0)}.png", size=512)
    again = cfg(data, tmp_path / "runs", image_size="auto", head="global")
    prepare_run(again)
    assert again.image_size == 256
    fresh = cfg(data, tmp_path / "runs", image_size="auto", head="global", name="new")
    prepare_run(fresh)
    assert fresh.image_size == 512  # a new run samples the folder as it is


def test_more_head_epochs_after_phase_two_began_are_refused_before_anything_is_recorded(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    prepare_run(cfg(data, tmp_path / "runs", head_epochs=2, finetune_epochs=2))
    run = tmp_path / "runs" / "r"
    history = [{"epoch": 1, "phase": "head", "phase_epoch": 1}, {"epoch": 2, "phase": "head", "phase_epoch": 2},
               {"epoch": 3, "phase": "finetune", "phase_epoch": 1}]
    (run / "checkpoint_2026-01-01_00-00-03.000000").mkdir()
    (run / "checkpoint_2026-01-01_00-00-03.000000" / "state.json").write_text(json.dumps(
        {"phase_index": 1, "phase_epoch": 1, "global_epoch": 3, "history": history}))
    record = (run / RUN_FILE).read_text()
    with pytest.raises(ValueError, match=r"--head-epochs 4: run .*r trained 2 head epoch\(s\) and has begun phase 2"):
        prepare_run(cfg(data, tmp_path / "runs", head_epochs=4, finetune_epochs=2))
    assert (run / RUN_FILE).read_text() == record
    prepare_run(cfg(data, tmp_path / "runs", head_epochs=2, finetune_epochs=3))  # phase 2 may grow
    # A record an older version raised (4 recorded, 2 trained) stays resumable with its own value
    rec = json.loads((run / RUN_FILE).read_text())
    rec["config"]["head_epochs"] = 4
    (run / RUN_FILE).write_text(json.dumps(rec))
    prepare_run(cfg(data, tmp_path / "runs", head_epochs=4, finetune_epochs=3))
    with pytest.raises(ValueError, match="--head-epochs 5"):
        prepare_run(cfg(data, tmp_path / "runs", head_epochs=5, finetune_epochs=3))


def test_a_sweep_keeps_the_epochs_it_started_with():
    from artifact_core.run_identity import differences

    old = {"kind": "sweep", "identity": {}, "config": {"head_epochs": 4, "finetune_epochs": 2}}
    for change in ({"head_epochs": 6}, {"finetune_epochs": 3}, {"finetune_epochs": 1}):
        new = {**old, "config": {**old["config"], **change}}
        assert differences(old, new), change
    train = {**old, "kind": "train"}
    assert differences(train, {**train, "config": {"head_epochs": 6, "finetune_epochs": 2}}) == []


def test_a_large_split_keeps_names_that_are_not_utf8(tmp_path, monkeypatch):
    import os

    from artifact_core import run_identity
    from artifact_core.run_identity import SPLIT_PARQUET, Split, read_split, write_split
    from artifact_core.storage import resolve

    monkeypatch.setattr(run_identity, "SPLIT_JSON_MAX_FILES", 2)  # the Parquet form, as above 50,000 files
    odd = os.fsdecode(b"caf\xe9_0.png")
    root = os.fsdecode(os.fsencode(str(tmp_path)) + b"/d\xe9")
    split = Split(root, [odd, "b_1.png"], [0, 1], ["c_1.png"], [1])
    run = resolve(str(tmp_path / "run"))
    run.makedirs()
    assert write_split(run, split) == SPLIT_PARQUET
    back = read_split(run, SPLIT_PARQUET)
    assert back.train_files == [odd, "b_1.png"] and back.root == root and back.val_labels == [1]


def test_overwrite_clears_an_interrupted_start_whose_data_folder_was_spelled_otherwise(tmp_path):
    data = make_easy_folder(tmp_path / "train", n=16)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    split = {"root": "/mnt/old-mount/train", "train": {"files": ["image_1_1.png"], "labels": [1]},
             "val": {"files": ["image_2_0.png"], "labels": [0]}}
    (run / SPLIT_JSON).write_text(json.dumps(split))
    with pytest.raises(RunConflictError, match="not a run of this project"):
        prepare_run(cfg(data, tmp_path / "runs"))
    prepare_run(cfg(data, tmp_path / "runs", overwrite=True))
    assert sorted(os.listdir(run)) == [RUN_FILE, SPLIT_JSON]
    assert json.loads((run / SPLIT_JSON).read_text())["root"] != split["root"]


def test_a_rotated_key_in_the_data_uri_is_the_same_run_and_no_secret_is_recorded_or_printed():
    from artifact_core.run_identity import differences, identity_of

    base = {"data_dir": "s3://AK:OLDSECRET@b/train?endpoint_override=m:9000", "image_size": 224}
    new = {"identity": identity_of({**base, "data_dir": "s3://AK:NEWSECRET@b/train?endpoint_override=m:9000"}),
           "kind": "train", "config": {}}
    assert "SECRET" not in json.dumps(new["identity"])
    # a record from before identities were stored without credentials
    old = {"identity": {**identity_of(base), "data_dir": base["data_dir"]}, "kind": "train", "config": {}}
    assert differences(old, new) == []
    # the key moved from the URI into the environment: the same data too
    env = {"identity": identity_of({**base, "data_dir": "s3://b/train?endpoint_override=m:9000"}), "kind": "train",
           "config": {}}
    assert differences(old, env) == []
    other = {"identity": identity_of({**base, "data_dir": "s3://AK:NEWSECRET@b/other"}), "kind": "train", "config": {}}
    diffs = differences(old, other)
    assert len(diffs) == 1 and "data_dir" in diffs[0] and "SECRET" not in diffs[0]


def test_one_data_folder_however_its_uri_is_spelled():
    from artifact_core.run_identity import differences, identity_of

    def record(data_dir: str) -> dict:
        return {"identity": identity_of({"data_dir": data_dir, "image_size": 224}), "kind": "train", "config": {}}

    old = record("s3://b/train/?scheme=http&endpoint_override=m:9000")
    assert differences(old, record("s3://b/train?endpoint_override=m:9000&scheme=http")) == []
    assert differences(old, record("s3://b/train//?endpoint_override=m:9000&scheme=http")) == []
    assert len(differences(old, record("s3://b/train?endpoint_override=m:9001&scheme=http"))) == 1
    assert len(differences(old, record("s3://b/train/x?endpoint_override=m:9000&scheme=http"))) == 1
    assert differences(old, record("s3://b/train?endpoint_override=m%3A9000&scheme=http")) == []  # encoded
    # Azure names the container where other schemes put a login: two containers, two folders
    assert len(differences(record("abfs://train@acct/faces"), record("abfs://test@acct/faces"))) == 1


def test_a_start_that_never_trained_may_be_lowered_and_a_hold_checks_the_record_again(tmp_path):
    """A first start refused before it trained (too many workers) fixes no epochs; and a start
    that waited for nodes does not take a run another start cleared (--overwrite) or resumed
    with more epochs meanwhile."""
    from artifact_core.run_identity import RunTakenOverError

    data = make_easy_folder(tmp_path / "train", n=16)
    prepare_run(cfg(data, tmp_path / "runs", finetune_epochs=5))  # refused before it trained
    held_run(cfg(data, tmp_path / "runs", finetune_epochs=3))
    record = json.loads((tmp_path / "runs" / "r" / RUN_FILE).read_text())
    assert record["config"]["finetune_epochs"] == 3
    assert record["history"][-1]["changed"]["finetune_epochs"] == [5, 3]

    waiting = prepare_run(cfg(data, tmp_path / "runs", finetune_epochs=3))  # waits for nodes...
    raised = held_run(cfg(data, tmp_path / "runs", finetune_epochs=8))
    with pytest.raises(RunConflictError, match="finetune_epochs: 8 before, 3 now"):
        run_identity.hold_run(waiting["run_folder"], waiting["holder"], waiting["record_config"],
                              claim=waiting["claim"])
    cleared = prepare_run(cfg(data, tmp_path / "runs", finetune_epochs=8, overwrite=True))
    with pytest.raises(RunTakenOverError, match="was started again"):
        run_identity.hold_run(raised["run_folder"], raised["holder"], raised["record_config"], claim=raised["claim"])
    assert "started it again" in run_identity.holder_lost(raised["run_folder"], raised["holder"]["id"])
    assert cleared["claim"]["start_id"] != raised["claim"]["start_id"]


def test_a_run_record_holds_no_credentials_of_its_uris_also_after_a_key_rotation(tmp_path):
    from artifact_core.run_identity import Split, claim_run, hold_run, new_holder
    from artifact_core.storage import resolve

    run = resolve(str(tmp_path / "runs" / "r"))
    split = Split("s3://b/train", ["image_1_1.png"], [1], ["image_2_0.png"], [0])

    def config(secret):
        return {**TrainConfig(image_size=64, weights="none").to_dict(),
                "data_dir": f"s3://AK:{secret}@b/train", "storage_path": f"s3://AK:{secret}@b/runs"}

    for secret in ("OLDSECRET", "NEWSECRET"):  # the second start resumes: the same data, another key
        got = claim_run(run, config=config(secret), kind="train", listed=["image_1_1.png", "image_2_0.png"],
                        data_root="s3://b/train", make_split=lambda: split)
        assert got.files() == split.files()
        hold_run(run, new_holder(), config(secret))
    record = (tmp_path / "runs" / "r" / RUN_FILE).read_text()
    assert "SECRET" not in record and "SECRET" not in (tmp_path / "runs" / "r" / SPLIT_JSON).read_text()
    assert len(json.loads(record)["history"]) == 2


def test_the_latest_start_holds_the_run_and_an_earlier_one_learns_it_lost_it(tmp_path, monkeypatch):
    """A rerun (or --overwrite) while the first job still runs: the record names the new start
    as the holder, and the earlier job is told so (it then stops and exports nothing)."""
    from artifact_core.run_identity import RunTakenOverError, check_holder, hold_run, holder_lost

    def start(**kw) -> dict:
        return held_run(cfg(data, tmp_path / "runs", **kw))

    data = make_easy_folder(tmp_path / "train", n=16)
    first = start()
    run = first["run_folder"]
    assert holder_lost(run, first["run_holder"]) == ""
    # A rerun refused before its workers start (too many workers, Ctrl-C while it waits)
    # claims the folder but does not hold it: the running job goes on.
    prepare_run(cfg(data, tmp_path / "runs"))
    assert holder_lost(run, first["run_holder"]) == ""
    second = start()  # the same command again, and it trains
    record = json.loads((tmp_path / "runs" / "r" / RUN_FILE).read_text())
    assert record["holder"]["id"] == second["run_holder"] != first["run_holder"]
    assert record["holder"]["pid"] == os.getpid() and record["holder"]["host"]
    lost = holder_lost(run, first["run_holder"])
    assert "was taken over" in lost and f"pid {os.getpid()}" in lost and str(tmp_path / "runs" / "r") in lost
    assert holder_lost(run, second["run_holder"]) == ""
    with pytest.raises(RunTakenOverError, match="was taken over"):
        check_holder(run, first["run_holder"])
    check_holder(run, second["run_holder"])
    # an unnamed run has no folder to lose
    assert holder_lost(None, "x") == ""

    third = start(overwrite=True)
    assert holder_lost(run, second["run_holder"]) and holder_lost(run, third["run_holder"]) == ""
    (tmp_path / "runs" / "r" / RUN_FILE).unlink()  # deleted under the running job
    assert "is gone" in holder_lost(run, third["run_holder"])

    # A record that cannot be read for a moment (an object store's passing error) takes
    # nothing away: training goes on.
    with pytest.raises(RunTakenOverError, match="lost its run_config.json"):
        hold_run(run, third["holder"])
    fourth = start(overwrite=True)

    def failing_read(loc):
        raise OSError("503 Slow Down")
    monkeypatch.setattr(run_identity, "read_record", failing_read)
    assert holder_lost(run, fourth["run_holder"]) == "" and holder_lost(run, "someone else") == ""


def test_a_rerun_that_resumes_from_a_checkpoint_does_not_load_its_weights_again(tmp_path, monkeypatch):
    """The checkpoint replaces every weight: a --weights file deleted since, or a head node
    now offline, must not stop the rerun, and the bundle names the source the run started from."""
    from artifact_core import trainer
    from artifact_core.model import WeightsUnavailableError

    data = make_easy_folder(tmp_path / "train", n=16)
    first = prepare_run(cfg(data, tmp_path / "runs", weights="bundled"))
    assert "bundled" in first["weights_source"] or "shipped" in first["weights_source"]
    run = tmp_path / "runs" / "r"
    assert json.loads((run / RUN_FILE).read_text())["weights_source"] == first["weights_source"]

    def unavailable(weights, **kwargs):
        raise WeightsUnavailableError(f"--weights {weights}: gone")
    monkeypatch.setattr(trainer, "resolve_weights", unavailable)
    # No checkpoint Ray would resume from (none, or one its list does not name): the weights are needed.
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    (run / "checkpoint_2026-01-01_00-00-00.000000" / "state.json").write_text("{}")
    with pytest.raises(WeightsUnavailableError, match="gone"):
        prepare_run(cfg(data, tmp_path / "runs", weights="bundled"))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-02_00-00-00.000000"}}))
    with pytest.raises(WeightsUnavailableError, match="gone"):  # named, but not there
        prepare_run(cfg(data, tmp_path / "runs", weights="bundled"))
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-00.000000"}}))
    again = prepare_run(cfg(data, tmp_path / "runs", weights="bundled"))
    assert again["weights_source"] == first["weights_source"] and again["split"] == first["split"]
    from artifact_core.storage import resolve
    assert trainer._resumed_weights_source(resolve(str(run))) == first["weights_source"]
