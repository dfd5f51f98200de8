"""Folders, labels, splits and class weights, with every bad-input case."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from artifact_core.data import (ARTIFACT, CLEAN, FolderListingError, check_split, class_weights, list_image_files,
                                list_images, parse_label, scan_labeled_folder, stratified_split)
from artifact_core.dataset import DecodeCache, EpochSampler, ImageFileDataset, Unreadable, collate_readable
from artifact_core.transforms import eval_transform, train_transform
from conftest import write_image


def test_list_images_recursive_case_insensitive_sorted(tmp_path):
    for name in ["b/image_1_1.PNG", "a/image_0_0.jpg", "image_2_1.JPEG", "x.webp", "y.BmP", "notes.txt", ".hidden.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = list_images(tmp_path)
    assert [p.split(str(tmp_path))[1] for p in found] == [
        "/a/image_0_0.jpg", "/b/image_1_1.PNG", "/image_2_1.JPEG", "/x.webp", "/y.BmP"]


def test_list_images_follows_linked_folders_once(tmp_path):
    """A folder linked in (shards on another disk) is listed like any other; a link back up
    the tree is no loop, and a folder reached through two paths lists its images once."""
    for name in ["train/shard1/a_0.png", "store/shard2/c_0.png", "store/shard2/deep/d_1.png", "train/.h/e_1.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    train = tmp_path / "train"
    os.symlink(tmp_path / "store" / "shard2", train / "shard2")
    os.symlink(train, train / "shard1" / "up")  # a loop
    os.symlink(tmp_path / "store" / "shard2", train / "shard3")  # shard2 again
    os.symlink(tmp_path / "store" / "shard2", train / ".hidden_link")
    found = [os.path.relpath(p, train) for p in list_images(train)]
    assert found == ["shard1/a_0.png", "shard2/c_0.png", "shard2/deep/d_1.png"]
    # scoring's listing and training's scan go through the same function
    assert list_image_files(str(train))[0] == list_images(train)
    assert scan_labeled_folder(train).paths == list_images(train)


def test_list_images_refuses_an_unreadable_subfolder(tmp_path, monkeypatch):
    """Leaving out a folder that cannot be listed would drop its images in silence: it is an
    error naming the folder. (Simulated: tests may run as root, which chmod cannot lock out.)"""
    for name in ["a_0.png", "locked/b_1.png", "shard/c_1.png", ".locked_hidden/d_0.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    locked = {str(tmp_path / "locked"), str(tmp_path / ".locked_hidden")}
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for listing in (lambda: list_images(tmp_path), lambda: list_image_files(str(tmp_path)),
                    lambda: scan_labeled_folder(tmp_path)):
        with pytest.raises(FolderListingError) as err:
            listing()
        assert err.value.folder == str(tmp_path / "locked") and err.value.reason == "Permission denied"
        assert f"cannot list folder {str(tmp_path / 'locked')!r}" in str(err.value)
    locked.discard(str(tmp_path / "locked"))  # a hidden folder is never opened: no error
    assert [os.path.relpath(p, tmp_path) for p in list_images(tmp_path)] == ["a_0.png", "locked/b_1.png",
                                                                            "shard/c_1.png"]


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "f.png")


@pytest.mark.parametrize("name,label", [("image_3_0.png", ARTIFACT), ("image_12_1.JPG", CLEAN),
                                        ("face_v2_final_1.webp", CLEAN), ("/a/b/x_0.bmp", ARTIFACT)])
def test_parse_label(name, label):
    assert parse_label(name) == label


@pytest.mark.parametrize("name", ["image_3_2.png", "image_3.png", "image_3_1.txt", "image_3_01.png", "image_31.png",
                                  "image_3_1\n.png"])
def test_parse_label_errors_name_the_file_and_pattern(name):
    with pytest.raises(ValueError) as err:
        parse_label(name)
    assert repr(name.split("/")[-1]) in str(err.value) and "<name>_<0|1>.<ext>" in str(err.value)


def test_scan_labeled_folder(tmp_path):
    for i, y in enumerate([0, 1, 1, 1]):
        write_image(tmp_path / f"image_{i}_{y}.png")
    write_image(tmp_path / "batch2" / "stray.png")
    write_image(tmp_path / "image_9_2.png")  # a label other than 0 or 1
    with pytest.raises(ValueError) as err:
        scan_labeled_folder(tmp_path)
    # the file's place under the folder (base names repeat across subfolders), how many, the way out
    assert "cannot read label from 'batch2/stray.png'" in str(err.value)
    assert "2 of 6 image file(s) lack one (--skip-unlabeled" in str(err.value)
    folder = scan_labeled_folder(tmp_path, skip_unlabeled=True)
    assert folder.counts() == {ARTIFACT: 1, CLEAN: 3}
    assert sorted(p.split("/")[-1] for p in folder.skipped) == ["image_9_2.png", "stray.png"]


def test_scan_empty_and_single_class(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        scan_labeled_folder(tmp_path)
    write_image(tmp_path / "image_0_1.png")
    write_image(tmp_path / "image_1_1.png")
    with pytest.raises(ValueError, match="only class 1"):
        scan_labeled_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        scan_labeled_folder(tmp_path / "missing")


def test_scan_all_unlabeled_skipped(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no file .* matches"):
        scan_labeled_folder(tmp_path, skip_unlabeled=True)


def test_stratified_split_keeps_ratio_and_is_seeded():
    labels = [0] * 10 + [1] * 90
    tr, va = stratified_split(labels, val_fraction=0.2, seed=1)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
    assert sum(labels[i] == 0 for i in va) == 2
    tr2, va2 = stratified_split(labels, val_fraction=0.2, seed=1)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(labels, val_fraction=0.2, seed=2)[1])


@pytest.mark.parametrize("val_fraction", [0.1, 0.5, 0.6, 0.9])
def test_stratified_split_puts_a_one_member_class_in_training(val_fraction):
    """A class with one image cannot be in both parts: it trains (a model cannot learn a class
    it never sees; validation does without it, and check_split says what that costs)."""
    labels = [1] * 20 + [0]
    tr, va = stratified_split(labels, val_fraction=val_fraction)
    assert 20 in tr and 20 not in va
    assert sum(labels[i] == 1 for i in va) == min(max(round(20 * val_fraction), 1), 19)


def test_check_split_refuses_what_cannot_train_and_warns_about_what_cannot_be_tuned():
    assert check_split([0, 1, 1], [0, 1], 0.2) == []
    with pytest.raises(ValueError) as err:
        check_split([1, 1, 1], [0, 1], 0.6)
    msg = str(err.value)
    assert "no artifact (0) image in training" in msg and "--val-fraction (now 0.6)" in msg
    assert "train: 0 artifact (0), 3 artifact-free (1); validation: 1 artifact (0), 1 artifact-free (1)" in msg
    with pytest.raises(ValueError, match=r"training empty \(train: 0 artifact \(0\), 0 artifact-free \(1\); "
                                         r"validation: 1 artifact \(0\), 1 artifact-free \(1\)\).*--val-fraction"):
        check_split([], [0, 1], 0.9)
    with pytest.raises(ValueError, match=r"validation empty \(train: 1 artifact \(0\), 1 artifact-free \(1\); "
                                         r"validation: 0 artifact \(0\), 0 artifact-free \(1\)\).*--val-fraction 0.2"):
        check_split([0, 1], [], 0.2)
    warnings = check_split([0, 1, 1], [1, 1], 0.5)
    assert len(warnings) == 1
    assert warnings[0].startswith("validation holds no artifact (0) image (train: 1 artifact (0), 2 artifact-free (1); "
                                  "validation: 0 artifact (0), 2 artifact-free (1)): the threshold cannot be tuned")
    assert "--val-fraction 0.5" in warnings[0]
    # numpy labels, as the split gives them
    assert check_split(np.array([0, 1]), np.array([0, 1]), 0.2) == []


def test_a_split_of_a_one_artifact_folder_passes_the_check_with_a_warning():
    labels = [0] + [1] * 99
    tr, va = stratified_split(labels, val_fraction=0.6)
    warnings = check_split([labels[i] for i in tr], [labels[i] for i in va], 0.6)
    assert len(warnings) == 1 and "no artifact (0)" in warnings[0]


def test_stratified_split_tiny_minority_lands_in_both():
    tr, va = stratified_split([0, 0] + [1] * 8, val_fraction=0.1)
    y = np.array([0, 0] + [1] * 8)
    assert (y[tr] == 0).sum() == 1 and (y[va] == 0).sum() == 1
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split([0, 1], val_fraction=1.0)


def test_class_weights_balanced():
    w = class_weights([0] * 10 + [1] * 90)
    assert w == pytest.approx([100 / 20, 100 / 180])
    with pytest.raises(ValueError, match=r"no example of class \[0\]"):
        class_weights([1, 1])


def test_dataset_marks_unreadable_and_collate_drops_them(tmp_path):
    good = write_image(tmp_path / "image_0_1.png")
    text = tmp_path / "image_1_0.png"
    text.write_text("not an image")
    truncated = tmp_path / "image_2_0.png"
    truncated.write_bytes(good.read_bytes()[:60])
    gone = tmp_path / "image_3_1.png"  # listed, then removed
    ds = ImageFileDataset([str(good), str(text), str(truncated), str(gone)], [1, 0, 0, 1],
                          eval_transform(image_size=32))
    x, y = ds[0]
    assert tuple(x.shape) == (3, 32, 32) and y == 1
    marks = [ds[i] for i in (1, 2, 3)]
    assert all(isinstance(m, Unreadable) for m in marks)
    assert [m.path for m in marks] == [str(text), str(truncated), str(gone)]
    assert "vanished" in marks[2].reason and marks[0].reason and marks[1].reason
    xb, yb, bad = collate_readable([ds[i] for i in range(4)], image_size=32)
    assert tuple(xb.shape) == (1, 3, 32, 32) and yb.tolist() == [1] and len(bad) == 3
    # a batch of only unreadable files stays a (empty) batch: every DDP rank steps alike
    xb, yb, bad = collate_readable(marks, image_size=32)
    assert tuple(xb.shape) == (0, 3, 32, 32) and yb.numel() == 0 and len(bad) == 3
    with pytest.raises(ValueError, match="paths but"):
        ImageFileDataset([str(good)], [], eval_transform())


def test_decode_cache_gives_the_same_pixels_without_decoding_again(tmp_path, monkeypatch):
    import artifact_core.dataset as dataset_mod
    from artifact_core.transforms import train_transform

    paths = [str(write_image(tmp_path / f"image_{i}_1.png", size=96)) for i in range(3)]
    bad = tmp_path / "image_9_0.png"
    bad.write_text("not an image")
    fresh = ImageFileDataset(paths, [1, 1, 1], eval_transform(image_size=32), target_size=32)
    # a budget for exactly two 32 x 32 RGB images
    cache = DecodeCache(2 * 32 * 32 * 3)
    ds = ImageFileDataset(paths + [str(bad)], [1, 1, 1, 0], eval_transform(image_size=32), target_size=32, cache=cache)
    first = [ds[i][0] for i in range(3)]
    assert len(cache) == 2 and cache.used == 2 * 32 * 32 * 3  # the third did not fit
    reads = []
    real_read = dataset_mod.read_file_bytes
    monkeypatch.setattr(dataset_mod, "read_file_bytes", lambda p, fs=None: reads.append(p) or real_read(p, fs))
    again = [ds[i][0] for i in range(3)]
    assert reads == [paths[2]]  # only the image over budget is read again
    for i in range(3):
        assert torch.equal(first[i], again[i]) and torch.equal(again[i], fresh[i][0])
    # an unreadable file is never cached: it is reported (and counted) every epoch
    assert all(isinstance(ds[3], Unreadable) for _epoch in range(2)) and len(cache) == 2
    # augmentation works on a copy: the kept image stays the decoder's output
    aug = ImageFileDataset(paths[:1], [1], train_transform(image_size=32), target_size=32, cache=cache)
    for _ in range(3):
        aug[0]
    assert torch.equal(ds[0][0], fresh[0][0])


def test_decode_cache_keys_include_the_size(tmp_path):
    path = str(write_image(tmp_path / "image_0_1.png", size=96))
    cache = DecodeCache(1 << 20)
    small = ImageFileDataset([path], [1], eval_transform(image_size=32), target_size=32, cache=cache)
    large = ImageFileDataset([path], [1], eval_transform(image_size=64), target_size=64, cache=cache)
    fresh = ImageFileDataset([path], [1], eval_transform(image_size=64), target_size=64)
    assert tuple(small[0][0].shape) == (3, 32, 32)
    decoded, cached = large[0][0], large[0][0]  # the second comes from the cache
    assert torch.equal(decoded, fresh[0][0]) and torch.equal(cached, fresh[0][0]) and len(cache) == 2


def test_decode_cache_budget_reserves_validation_first():
    from artifact_core.config import TrainConfig
    from artifact_core.train_loop import _decode_caches

    assert TrainConfig().decode_cache_mb == 1024
    with pytest.raises(ValueError, match="--decode-cache-mb"):
        TrainConfig(decode_cache_mb=-1).validate()
    train, val = _decode_caches(TrainConfig(image_size=64, decode_cache_mb=1), n_val=2)
    assert val.max_bytes == 2 * 3 * 64 * 64 and train.max_bytes == (1 << 20) - val.max_bytes
    train, val = _decode_caches(TrainConfig(image_size=448, decode_cache_mb=1), n_val=10)
    assert val.max_bytes == 1 << 20 and train.max_bytes == 0  # validation alone fills it
    assert _decode_caches(TrainConfig(image_size=448, decode_cache_mb=0), n_val=2) == (None, None)
    # each DataLoader process would fill its own copy: off
    assert _decode_caches(TrainConfig(image_size=448, loader_workers=2), n_val=2) == (None, None)


def test_image_size_probe_does_not_block_on_fifos_or_devices(tmp_path):
    """The size probe opens files in the driver before any worker starts: a FIFO named like an
    image (or a device) is left out of the sample instead of blocking the run forever."""
    import threading

    from PIL import Image

    from artifact_core.data import native_short_side

    data = tmp_path / "train"
    data.mkdir()
    Image.new("RGB", (900, 700), (30, 90, 120)).save(data / "image_0_1.png")
    os.mkfifo(data / "image_1_0.png")  # nobody ever writes to it: a plain open() waits forever
    result = {}
    probe = threading.Thread(daemon=True, target=lambda: result.update(
        side=native_short_side([str(data / "image_1_0.png"), os.devnull, str(data / "image_0_1.png")])))
    probe.start()
    probe.join(60)
    assert not probe.is_alive(), "native_short_side blocked on a FIFO"
    assert result["side"] == 700


def test_links_up_the_tree_into_an_excluded_folder_or_to_nowhere_are_not_followed(tmp_path, caplog):
    import logging

    from conftest import write_image

    root = tmp_path / "in"
    write_image(root / "a" / "b" / "x_1.png")
    write_image(tmp_path / "sibling" / "s_1.png")
    write_image(tmp_path / "out" / "report" / "thumb.png")
    (root / "a" / "b" / "up").symlink_to(tmp_path)  # an ancestor: its siblings are no input
    (root / "outlink").symlink_to(tmp_path / "out")
    (root / "gone").symlink_to(tmp_path / "unmounted")
    with caplog.at_level(logging.WARNING, logger="artifact_core.data"):
        listed = list_images(root, exclude=[str(tmp_path / "out")])
    assert [os.path.relpath(p, root) for p in listed] == ["a/b/x_1.png"]
    assert "unmounted" in caplog.text
    assert "outlink/report/thumb.png" in [os.path.relpath(p, root) for p in list_images(root)]


def test_a_looping_link_among_the_files_is_skipped_not_fatal(tmp_path, caplog):
    import logging

    from conftest import write_image

    write_image(tmp_path / "in" / "x_1.png")
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in" / "loop")
    with caplog.at_level(logging.WARNING, logger="artifact_core.data"):
        assert [os.path.basename(p) for p in list_images(tmp_path / "in")] == ["x_1.png"]
    assert "loops" in caplog.text


def test_each_images_augmentation_is_fixed_by_seed_epoch_and_index(tmp_path):
    """What makes a resumed epoch augment as the uninterrupted one: not the process's random
    stream (a restart begins it anew; persistent loader processes carry theirs on), but the
    image's own seed for the epoch, whichever process draws it."""
    from functools import partial

    from torch.utils.data import DataLoader, SequentialSampler

    paths = [str(write_image(tmp_path / f"image_{i}_{i % 2}.png", size=40, color=(30 * i, 90, 200 - 30 * i)))
             for i in range(6)]
    ds = ImageFileDataset(paths, [i % 2 for i in range(6)], train_transform(image_size=32), target_size=32, seed=7)
    torch.manual_seed(0)
    first = ds[(3, 5, 0)][0]
    torch.rand(1000)  # whatever the stream did in between
    assert torch.equal(ds[(3, 5, 0)][0], first)
    assert not torch.equal(ds[(3, 6, 0)][0], first), "another epoch must draw another augmentation"
    assert not torch.equal(ds[(3, 5, 1)][0], first), "a second draw (oversampling) must be augmented anew"
    before = torch.random.get_rng_state()
    ds[(2, 5, 0)]
    assert torch.equal(torch.random.get_rng_state(), before), "the process's stream must be left as it was"

    def epochs(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(SequentialSampler(ds))
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                            collate_fn=partial(collate_readable, image_size=32))
        out = []
        for epoch in (4, 5):
            sampler.set_epoch(epoch)
            out += [x for x, _, _ in loader]
        return out

    torch.manual_seed(1)
    in_process = epochs(0)
    torch.manual_seed(2)
    for a, b in zip(in_process, epochs(2)):  # two persistent loader processes, another start
        assert torch.equal(a, b)
    assert not torch.equal(in_process[0], in_process[2]), "epochs 4 and 5 augmented alike"


def test_a_class_of_which_no_sampled_file_reads_is_refused_naming_one(tmp_path):
    """A clone without `git lfs pull` holds pointer files named .png: training would skip
    them all and learn nothing of the class without a word."""
    from artifact_core.data import check_classes_readable, scan_labeled_folder

    for i in range(12):
        write_image(tmp_path / f"image_{i}_1.png", size=24)
    for i in range(12, 15):
        (tmp_path / f"image_{i}_0.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    folder = scan_labeled_folder(tmp_path)
    with pytest.raises(ValueError, match=r"none of 3 artifact image\(s\) \(0\) sampled from 3 could be read, "
                                         r"e\.g\. .*image_12_0\.png.*Git LFS pointer file.*git lfs pull"):
        check_classes_readable(folder.paths, folder.labels, folder.fs)
    write_image(tmp_path / "image_15_0.png", size=24)  # one readable artifact among the sample: trains
    folder = scan_labeled_folder(tmp_path)
    check_classes_readable(folder.paths, folder.labels, folder.fs)


def test_a_file_under_two_names_is_one_training_image(tmp_path, monkeypatch):
    """A link or a hard link to a listed file would be a second image, which a split could put
    on the other side of the train/validation line. The listing keeps every name (a stored
    split drawn from them still resumes); a new split takes each file once."""
    from artifact_core.data import distinct_files, scan_labeled_folder

    for i in range(4):
        write_image(tmp_path / "a" / f"image_{i}_{i % 2}.png", size=24)
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a" / "image_0_0.png", tmp_path / "b" / "image_0_0.png")
    os.link(tmp_path / "a" / "image_1_1.png", tmp_path / "b" / "copy_0.png")  # another label, too
    folder = scan_labeled_folder(tmp_path)
    assert len(folder.paths) == 6
    keep = distinct_files(folder.paths, folder.labels)
    assert [os.path.relpath(folder.paths[i], tmp_path) for i in keep] == [f"a/image_{i}_{i % 2}.png" for i in range(4)]
    # a file system without inode numbers keeps every name
    real_stat = os.stat

    def no_inodes(p, *a, **k):
        st = real_stat(p, *a, **k)
        return os.stat_result((st.st_mode, 0, st.st_dev, st.st_nlink, *tuple(st)[4:]))

    monkeypatch.setattr(os, "stat", no_inodes)
    assert len(distinct_files(folder.paths, folder.labels)) == 6


def test_a_listing_names_the_files_it_leaves_out_and_takes_jpeg_by_its_other_names(tmp_path, caplog):
    """A TIFF or a text file among the images gets no row: one warning counts them by extension.
    JPEGs saved as .jfif (a browser's default on Windows) or .jpe are images."""
    import logging

    from artifact_core.data import list_image_files, list_images
    from artifact_core.images import decode_image

    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "sub" / "b.JFIF", fmt="JPEG")
    write_image(tmp_path / "in" / "c.jpe", fmt="JPEG")
    write_image(tmp_path / "in" / "d.tif", fmt="TIFF")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / ".DS_Store").write_text("x")  # hidden: not worth a word
    with caplog.at_level(logging.WARNING, logger="artifact_core.data"):
        listed = list_images(tmp_path / "in")
    assert [os.path.relpath(p, tmp_path / "in") for p in listed] == ["a.png", "c.jpe", os.path.join("sub", "b.JFIF")]
    assert decode_image(listed[2], max_side=16).size == (16, 16)
    assert "2 file(s) under" in caplog.text and ".tif 1" in caplog.text and ".txt 1" in caplog.text
    assert "DS_Store" not in caplog.text
    caplog.clear()
    write_image(tmp_path / "clean" / "a.png")
    with caplog.at_level(logging.WARNING, logger="artifact_core.data"):
        list_image_files(str(tmp_path / "clean"))
    assert "not listed" not in caplog.text
