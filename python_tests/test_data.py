"""Dataset readers, augmentation and loaders (toponas_kernels.data), on tiny files written in each
real format, plus Debian's Fashion-MNIST files when they are installed."""

import gzip
import os
import sys
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from toponas_kernels import data as D
from toponas_kernels.data import DataError


# ---------------------------------------------------------------------------------------------
# Writers of tiny files in the real formats


def _pattern(n, c, size, start=0):
    """A known uint8 pattern in CHW order, different for every image, channel, row and column:
    returned as the [n, c*size*size] rows the pickles hold and as the expected [n, H, W, C]."""
    i, ch, y, x = np.meshgrid(np.arange(start, start + n), np.arange(c), np.arange(size), np.arange(size),
                              indexing="ij")
    chw = ((i * 37 + ch * 71 + y * 5 + x * 3) % 256).astype(np.uint8)
    return chw.reshape(n, -1), chw.transpose(0, 2, 3, 1)


def _pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _write_cifar(root, which="cifar10", per_batch=2, test_n=3):
    """CIFAR python version: dicts with bytes keys (as the real Python 2 pickles read back)."""
    sub, train_files, test_file, key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"),
        "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels"),
    }[which]
    classes = 10 if which == "cifar10" else 100
    folder = os.path.join(root, sub)
    os.makedirs(folder)
    expected = {"train": ([], []), "test": ([], [])}
    start = 0
    for split, files, n in (("train", train_files, per_batch), ("test", [test_file], test_n)):
        for f in files:
            rows, hwc = _pattern(n, 3, 32, start)
            labels = [(start + k) * 7 % classes for k in range(n)]
            start += n
            _pickle(os.path.join(folder, f), {b"batch_label": b"x", key: labels, b"data": rows,
                                              b"filenames": [b"a.png"] * n}, protocol=2)
            expected[split][0].append(hwc)
            expected[split][1].append(labels)
    return folder, {s: (np.concatenate(v[0]), np.concatenate(v[1])) for s, v in expected.items()}


def _write_imagenet16(folder, labels_per_file):
    """NB201's ImageNet16: str keys, 1-based labels up to 1000; returns the expected kept images/labels."""
    os.makedirs(folder, exist_ok=True)
    names = [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]
    expected = {"train": ([], []), "test": ([], [])}
    start = 0
    for name in names:
        labels = np.array(labels_per_file(name))
        rows, hwc = _pattern(len(labels), 3, 16, start)
        start += len(labels)
        _pickle(os.path.join(folder, name), {"data": rows, "labels": labels.tolist(), "mean": np.zeros(768)})
        keep = labels <= 120
        split = "test" if name == "val_data" else "train"
        expected[split][0].append(hwc[keep])
        expected[split][1].append(labels[keep] - 1)
    return {s: (np.concatenate(v[0]), np.concatenate(v[1])) for s, v in expected.items()}


def _idx_bytes(arr):
    head = bytes((0, 0, 8, arr.ndim)) + np.array(arr.shape, ">u4").tobytes()
    return head + arr.astype(np.uint8).tobytes()


def _write_fashion(folder, gz, n_train=4, n_test=3):
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, (img_name, lab_name), n in (("train", D._IDX["train"], n_train), ("test", D._IDX["test"], n_test)):
        _, hwc = _pattern(n, 1, 28, 100 if split == "test" else 0)
        images = hwc[..., 0]
        labels = (np.arange(n) * 3 + (split == "test")) % 10
        for name, arr in ((img_name, images), (lab_name, labels)):
            path = os.path.join(folder, name + (".gz" if gz else ""))
            with (gzip.open if gz else open)(path, "wb") as f:
                f.write(_idx_bytes(arr))
        out[split] = (images, labels)
    return out


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, (p, msg)
    return msg


# ---------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_reads_batches_in_order_as_hwc(tmp_path, which):
    folder, expected = _write_cifar(str(tmp_path), which)
    for where in (str(tmp_path), folder):  # the parent or the batches folder itself
        for split in ("train", "test"):
            ds = D.load_split(which, split, where)
            images, labels = expected[split]
            assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
            assert tuple(ds.images.shape) == (len(labels), 32, 32, 3)
            assert np.array_equal(ds.images.numpy(), images)  # CHW rows -> HWC, pixel for pixel
            assert ds.labels.tolist() == labels.tolist()
            assert ds.info.num_classes == (10 if which == "cifar10" else 100)
    assert len(D.load_split(which, "train", str(tmp_path))) == (10 if which == "cifar10" else 2)


def test_imagenet16_keeps_first_120_classes_zero_based(tmp_path):
    def labels(name):
        return [1, 121, 120, 1000, 57] if name != "val_data" else [500, 2, 120]

    expected = _write_imagenet16(str(tmp_path / "ImageNet16"), labels)
    for where in (tmp_path, tmp_path / "ImageNet16"):
        train = D.load_split("imagenet16-120", "train", str(where))
        test = D.load_split("imagenet16-120", "test", str(where))
        assert tuple(train.images.shape) == (30, 16, 16, 3)  # 3 of 5 kept in each of 10 batches
        assert train.labels.tolist() == [0, 119, 56] * 10
        assert test.labels.tolist() == [1, 119]
        assert np.array_equal(train.images.numpy(), expected["train"][0])
        assert np.array_equal(test.images.numpy(), expected["test"][0])
    info = train.info
    assert (info.num_classes, info.image_size, info.crop_padding) == (120, 16, 2)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_idx_padded_to_32_at_offset_2(tmp_path, gz):
    expected = _write_fashion(str(tmp_path), gz)
    for split in ("train", "test"):
        images, labels = expected[split]
        ds3 = D.load_split("fashion-mnist", split, str(tmp_path))
        ds1 = D.load_split("fashion-mnist", split, str(tmp_path), channels=1)
        assert tuple(ds3.images.shape) == (len(labels), 32, 32, 3)
        assert tuple(ds1.images.shape) == (len(labels), 32, 32, 1)
        assert ds3.labels.tolist() == labels.tolist()
        for ds in (ds1, ds3):
            x = ds.images.numpy()
            for c in range(ds.info.channels):
                assert np.array_equal(x[:, 2:30, 2:30, c], images)
            border = x.copy()
            border[:, 2:30, 2:30, :] = 0
            assert not border.any()
    assert D.dataset_info("fashion-mnist").mean == (0.2860,) * 3


def test_fashion_torchvision_layout(tmp_path):
    expected = _write_fashion(str(tmp_path / "FashionMNIST" / "raw"), gz=True)
    ds = D.load_split("fashion-mnist", "test", str(tmp_path))
    assert ds.labels.tolist() == expected["test"][1].tolist()


@pytest.mark.skipif(not os.path.isdir(D.DEBIAN_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist():
    train = D.load_split("fashion-mnist", "train")
    test = D.load_split("fashion-mnist", "test", channels=1)
    assert tuple(train.images.shape) == (60000, 32, 32, 3)
    assert tuple(test.images.shape) == (10000, 32, 32, 1)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # The published statistics match the 28x28 content.
    inner = train.images[:, 2:30, 2:30, 0].float() / 255
    assert abs(inner.mean().item() - 0.2860) < 1e-3 and abs(inner.std().item() - 0.3530) < 1e-3


def test_dataset_info():
    info = D.dataset_info("CIFAR10")
    assert (info.name, info.num_classes, info.image_size, info.channels, info.crop_padding) == ("cifar10", 10, 32, 3, 4)
    assert D.dataset_info("fashion-mnist", channels=1).std == (0.3530,)
    im = D.dataset_info("imagenet16-120")
    assert im.mean == pytest.approx((0.4811, 0.4575, 0.4079), abs=1e-4)
    assert im.std == pytest.approx((0.2479, 0.2402, 0.2553), abs=1e-4)
    assert set(D.DATASETS) == set(D._STATS)


# ---------------------------------------------------------------------------------------------
# ImageSet: normalization and augmentation


def _imageset(n=12, size=32, augment="none", cutout=0, seed=0):
    info = D.dataset_info("synthetic") if size == 32 else D.dataset_info("imagenet16-120")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return D.ImageSet(images, torch.arange(n) % info.num_classes, info, augment=augment, cutout=cutout, seed=seed)


def test_normalization_matches_definition():
    ds = _imageset()
    mean = torch.tensor(ds.info.mean).view(3, 1, 1)
    std = torch.tensor(ds.info.std).view(3, 1, 1)
    for i in (0, 5):
        x, y = ds[i]
        ref = (ds.images[i].permute(2, 0, 1).double() / 255 - mean) / std
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and x.is_contiguous()
        assert y == i % 10 and isinstance(y, int)
        torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def _crops(ds, i):
    """Every (crop, flip) of image i that the search augmentation may produce, normalized."""
    p, s = ds.info.crop_padding, ds.info.image_size
    base = ds.with_augment("none")[i][0]
    zero = ((0 - torch.tensor(ds.info.mean)) / torch.tensor(ds.info.std)).view(3, 1, 1)
    padded = zero.expand(3, s + 2 * p, s + 2 * p).clone()
    padded[:, p:p + s, p:p + s] = base
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy:dy + s, dx:dx + s]
            out += [crop, crop.flip(2)]
    return out


@pytest.mark.parametrize("size", [32, 16])
def test_search_augment_is_a_padded_crop_and_flip(size):
    ds = _imageset(size=size, augment="search")
    seen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            x = ds[i][0]
            match = [k for k, c in enumerate(_crops(ds, i)) if torch.allclose(x, c, atol=1e-5)]
            assert match, (epoch, i)
            seen.add(match[0] % 2)
    assert seen == {0, 1}  # both flipped and unflipped images occur


def test_train_augment_adds_cutout():
    ds = _imageset(augment="train", cutout=16)
    cut = 0
    for i in range(len(ds)):
        x = ds[i][0]
        candidates = _crops(ds, i)
        # Away from the zeroed square, x is one of the crops; the square is at most 16x16.
        zero = (x == 0).all(0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        assert zero.sum() > 0
        assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
        cut += int(zero.sum())
        keep = ~zero
        assert any(torch.allclose(x[:, keep], c[:, keep], atol=1e-5) for c in candidates), i
    assert cut > 12 * 8 * 8  # on average well over a quarter of the square lies inside


def test_augmentation_deterministic_and_independent_of_global_rng():
    ds = _imageset(augment="search", seed=3)
    ds.set_epoch(4)
    torch.manual_seed(123)
    a = [ds[i][0] for i in range(len(ds))]
    torch.manual_seed(999)
    b = [ds.get(i, 4)[0] for i in range(len(ds))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_epoch = [ds.get(i, 5)[0] for i in range(len(ds))]
    other_seed = [ds.with_augment("search", seed=4).get(i, 4)[0] for i in range(len(ds))]
    assert any(not torch.equal(x, y) for x, y in zip(a, other_epoch))
    assert any(not torch.equal(x, y) for x, y in zip(a, other_seed))


def test_augmentation_leaves_global_rng_untouched():
    ds = _imageset(augment="train", cutout=8)
    before = torch.get_rng_state()
    for i in range(len(ds)):
        ds[i]
    assert torch.equal(before, torch.get_rng_state())


def test_imageset_argument_errors():
    ds = _imageset()
    with pytest.raises(ValueError, match="augment must be one of"):
        ds.with_augment("random")
    with pytest.raises(ValueError, match="augment='train' needs cutout"):
        ds.with_augment("train")
    with pytest.raises(ValueError, match="only used with augment='train'"):
        ds.with_augment("search", cutout=16)
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, 32, 32, 3\]"):
        D.ImageSet(ds.images.float(), ds.labels, ds.info)
    with pytest.raises(ValueError, match="labels must be int64"):
        D.ImageSet(ds.images, ds.labels[:3], ds.info)


# ---------------------------------------------------------------------------------------------
# split_indices and make_loader


def test_split_indices():
    assert D.split_indices(10) == (list(range(5)), list(range(5, 10)))
    assert D.split_indices(11) == (list(range(5)), list(range(5, 11)))
    assert D.split_indices(10, 0.3) == ([0, 1, 2], list(range(3, 10)))
    assert D.split_indices(4, 1.0) == ([0, 1, 2, 3], [])
    with pytest.raises(ValueError, match="portion must be in"):
        D.split_indices(10, 0.0)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        D.split_indices(-1)


class _Index(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        return i


def _epoch(loader):
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("drop_last", [False, True])
def test_make_loader_order_and_resume(drop_last):
    ds, idx = _Index(), list(range(10, 60))
    before = torch.get_rng_state()
    full = _epoch(D.make_loader(ds, idx, 8, seed=1, epoch=2, drop_last=drop_last))
    assert torch.equal(before, torch.get_rng_state())
    flat = sum(full, [])
    assert len(full) == (6 if drop_last else 7)
    assert (sorted(flat) == idx) if not drop_last else (len(set(flat)) == 48 and set(flat) <= set(idx))
    assert flat != idx  # shuffled
    torch.manual_seed(7)  # the global RNG has no say
    assert _epoch(D.make_loader(ds, idx, 8, seed=1, epoch=2, drop_last=drop_last)) == full
    assert _epoch(D.make_loader(ds, idx, 8, seed=1, epoch=3, drop_last=drop_last)) != full
    assert _epoch(D.make_loader(ds, idx, 8, seed=2, epoch=2, drop_last=drop_last)) != full
    for k in (1, 3, len(full)):
        assert _epoch(D.make_loader(ds, idx, 8, seed=1, epoch=2, start_batch=k, drop_last=drop_last)) == full[k:]
    assert sum(_epoch(D.make_loader(ds, idx, 8, seed=1, epoch=2, shuffle=False)), []) == idx


def test_make_loader_shards_partition_the_epoch():
    ds, idx = _Index(), list(range(10, 61))  # 51: the shards differ by one
    whole = sum(_epoch(D.make_loader(ds, idx, 51, seed=4, epoch=1)), [])
    shards = [sum(_epoch(D.make_loader(ds, idx, 5, seed=4, epoch=1, shard=(r, 2))), []) for r in range(2)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert _epoch(D.make_loader(ds, idx, 5, seed=4, epoch=1, shard=(1, 2), start_batch=2)) == \
        _epoch(D.make_loader(ds, idx, 5, seed=4, epoch=1, shard=(1, 2)))[2:]
    with pytest.raises(ValueError, match="shard"):
        D.make_loader(ds, idx, 5, seed=4, epoch=1, shard=(2, 2))


def test_make_loader_does_not_load_skipped_batches():
    class Counting(_Index):
        loaded = []

        def __getitem__(self, i):
            self.loaded.append(i)
            return i

    ds = Counting()
    rest = _epoch(D.make_loader(ds, range(40), 10, seed=0, epoch=0, start_batch=3))
    assert sorted(ds.loaded) == sorted(rest[0])


def test_make_loader_errors():
    with pytest.raises(ValueError, match=r"start_batch must be in 0\.\.4"):
        D.make_loader(_Index(), range(40), 10, seed=0, epoch=0, start_batch=5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        D.make_loader(_Index(), range(40), 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match=r"indices must lie in 0\.\.99"):
        D.make_loader(_Index(), [5, 100], 10, seed=0, epoch=0)


def test_loader_augmented_batches_resume_and_workers_agree():
    ds = _imageset(n=40, augment="train", cutout=16, seed=5)
    first, _ = D.split_indices(len(ds), 0.75)

    def run(**kw):
        return [(x, y) for x, y in D.make_loader(ds, first, 8, seed=9, epoch=1, **kw)]

    full = run()
    assert len(full) == 4 and full[0][0].shape == (8, 3, 32, 32) and full[0][1].dtype == torch.int64
    ds.set_epoch(0)  # loaders bind their own epoch; the dataset's current one does not matter
    resumed = run(start_batch=2)
    workers = run(num_workers=2)
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(full, workers, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ds.epoch == 1
    other = [x for x, _ in D.make_loader(ds, first, 8, seed=9, epoch=2, shuffle=False)]
    same_order = [x for x, _ in D.make_loader(ds, first, 8, seed=9, epoch=1, shuffle=False)]
    assert not all(torch.equal(a, b) for a, b in zip(other, same_order))  # new epoch, new crops


# ---------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_deterministic_and_balanced():
    a = D.load_split("synthetic", synthetic_size=100, seed=3)
    b = D.load_split("synthetic", synthetic_size=100, seed=3)
    c = D.load_split("synthetic", synthetic_size=100, seed=4)
    t = D.load_split("synthetic", "test", synthetic_size=100, seed=3)
    assert tuple(a.images.shape) == (100, 32, 32, 3) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, t.images)
    assert torch.bincount(a.labels).tolist() == [10] * 10


def test_synthetic_is_learnable(one_thread):
    train = D.load_split("synthetic", synthetic_size=512)
    test = D.load_split("synthetic", "test", synthetic_size=200)
    x = torch.stack([train[i][0] for i in range(len(train))])
    xt = torch.stack([test[i][0] for i in range(len(test))])
    model = torch.nn.Sequential(
        torch.nn.AvgPool2d(2), torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# Errors: one line naming the dataset, the path looked at and how to get the data


def test_unknown_dataset_split_channels():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; expected one of cifar10"):
        D.load_split("mnist")
    with pytest.raises(DataError, match="cifar10: split must be 'train' or 'test', got 'val'"):
        D.load_split("cifar10", "val")
    with pytest.raises(DataError, match="cifar10: channels must be 3"):
        D.dataset_info("cifar10", channels=1)
    with pytest.raises(DataError, match="fashion-mnist: channels must be 1 or 3, got 2"):
        D.load_split("fashion-mnist", channels=2)
    with pytest.raises(DataError, match="synthetic_size must be a positive int"):
        D.load_split("synthetic", synthetic_size=0)


@pytest.mark.parametrize("name, marker, hint", [
    ("cifar10", "cifar-10-batches-py/data_batch_1", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("cifar100", "cifar-100-python/train", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("imagenet16-120", "ImageNet16/train_data_batch_1", "image-net.org"),
    ("fashion-mnist", "train-images-idx3-ubyte", "dataset-fashion-mnist"),
])
def test_missing_directory(tmp_path, name, marker, hint):
    where = tmp_path / "nothing"
    with pytest.raises(DataError) as e:
        D.load_split(name, "train", str(where))
    _one_line(e, f"{name}:", os.path.join(str(where), marker), hint)


def test_missing_default_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPONAS_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(DataError) as e:
        D.load_split("fashion-mnist")
    _one_line(e, str(tmp_path / "debian" / "train-images-idx3-ubyte"),
              str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"))
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test")
    _one_line(e, str(tmp_path / "cifar-10-batches-py" / "test_batch"), "--data-dir")


def test_missing_and_broken_cifar_files(tmp_path):
    folder, _ = _write_cifar(str(tmp_path))
    os.remove(os.path.join(folder, "data_batch_3"))
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "train", str(tmp_path))
    _one_line(e, os.path.join(folder, "data_batch_3"), "cifar.html")
    path = os.path.join(folder, "test_batch")
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test", str(tmp_path))
    _one_line(e, path, "not a readable pickle")
    _pickle(path, [1, 2, 3])
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test", str(tmp_path))
    _one_line(e, path, "holds a list, expected a dict")
    _pickle(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test", str(tmp_path))
    _one_line(e, path, "expected uint8 [N, 3072]")
    _pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test", str(tmp_path))
    _one_line(e, path, "expected 2 integers")
    _pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test", str(tmp_path))
    _one_line(e, "labels of the test split range 0..10, expected 0..9")


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder, _ = _write_cifar(str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    _pickle(os.path.join(folder, "test_batch"), {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "test", str(tmp_path))
    _one_line(e, "refusing to load", "system")


def test_imagenet16_bad_labels(tmp_path):
    _write_imagenet16(str(tmp_path), lambda name: [0, 3])
    with pytest.raises(DataError) as e:
        D.load_split("imagenet16-120", "train", str(tmp_path))
    _one_line(e, "range 0..3, expected 1-based")


@pytest.mark.parametrize("gz", [False, True])
def test_broken_idx_files(tmp_path, gz):
    _write_fashion(str(tmp_path), gz)
    suffix = ".gz" if gz else ""
    path = str(tmp_path / ("train-images-idx3-ubyte" + suffix))
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:-40])
    with pytest.raises(DataError) as e:
        D.load_split("fashion-mnist", "train", str(tmp_path))
    _one_line(e, path, "truncated")
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + bytes(8))
    with pytest.raises(DataError) as e:
        D.load_split("fashion-mnist", "train", str(tmp_path))
    _one_line(e, path, "not an idx file of 3-d unsigned bytes")
    os.remove(str(tmp_path / ("t10k-labels-idx1-ubyte" + suffix)))
    with pytest.raises(DataError) as e:
        D.load_split("fashion-mnist", "test", str(tmp_path))
    _one_line(e, "no t10k-labels-idx1-ubyte[.gz]", str(tmp_path))


def test_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")
    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(tvd, "CIFAR10", Offline)
    monkeypatch.setattr(tvd, "FashionMNIST", Offline)
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "train", str(tmp_path), download=True)
    _one_line(e, f"download into {tmp_path} failed", "name resolution", "cifar-10-batches-py")
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(DataError) as e:
        D.load_split("fashion-mnist", "test", download=True)
    _one_line(e, "fashion-mnist: download into", "dataset-fashion-mnist")
    assert calls == [(str(tmp_path), True, True), (os.path.abspath(D.default_data_dir()), False, True)]


def test_download_without_torchvision_says_how_to_get_it(tmp_path, monkeypatch):
    """torchvision is optional (only a download uses it): without it, one line that names it."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DataError) as e:
        D.load_split("cifar10", "train", str(tmp_path), download=True)
    _one_line(e, "downloading it needs torchvision", "pip install torchvision", "cifar-10-batches-py")
