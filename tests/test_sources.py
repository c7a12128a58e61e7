"""Sources: webdataset shards (brace patterns), ImageFolder trees, CSV/JSONL/Parquet manifests, label mapping,
and decoding in DataLoader workers, on small sets of real CIFAR-10 samples."""

from __future__ import annotations

import csv
import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from retrofit.sources import (
    DecodeDataset,
    collate_decoded,
    imagefolder_source,
    manifest_source,
    map_labels,
    open_source,
    tar_members,
    webdataset_source,
)

PER_CLASS = 10  # samples per class in the mini set (10 classes -> 100 samples)
_ENCODERS: dict[str, object] = {}


def real_encoders() -> dict[str, object]:
    """The real Tiny Darknet and MiniLM encoders, loaded once per test process (shared by the test modules)."""
    if not _ENCODERS:
        from retrofit.encoders import load_image_encoder, load_text_encoder

        _ENCODERS.update(image_encoder=load_image_encoder("darknet-tiny"), text_encoder=load_text_encoder("minilm"))
    return dict(_ENCODERS)


def _pick(data_dir: Path, per_class: int) -> list[dict]:
    """``per_class`` real training samples of every CIFAR-10 class (the shards are sorted by class)."""
    out: list[dict] = []
    for s in range(5):
        path = data_dir / "cifar10" / f"train-{s:06d}.tar"
        want: dict[int, int] = {}
        samples: dict[str, dict] = {}
        with tarfile.open(path) as tf:
            members = tf.getmembers()
            by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                k, _, ext = m.name.partition(".")
                by_key.setdefault(k, {})[ext] = m
            for k, ms in by_key.items():
                lab = int(tf.extractfile(ms["cls"]).read().decode())
                if want.get(lab, 0) >= per_class:
                    continue
                want[lab] = want.get(lab, 0) + 1
                samples[k] = {"key": k, "label": lab, "jpg": tf.extractfile(ms["jpg"]).read(),
                              "caption": tf.extractfile(ms["txt"]).read().decode() if "txt" in ms else None}
        out += list(samples.values())
    return out


@pytest.fixture(scope="session")
def mini_samples(data_dir: Path) -> list[dict]:
    """100 real CIFAR-10 training samples, 10 per class, in class order."""
    return _pick(data_dir, PER_CLASS)


def write_shard(path: Path, samples: list[dict], extra: list[tuple[str, bytes]] = ()) -> None:
    """A webdataset shard of ``samples`` (keys, .jpg, .cls, .txt when captioned) plus raw ``extra`` members."""
    with tarfile.open(path, "w") as tf:
        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for s in samples:
            put(f"{s['key']}.jpg", s["jpg"])
            put(f"{s['key']}.cls", str(s["label"]).encode())
            if s["caption"] is not None:
                put(f"{s['key']}.txt", s["caption"].encode())
        for name, data in extra:
            put(name, data)


def make_shards(root: Path, samples: list[dict], classes: list[str], n: int = 2) -> str:
    """``n`` shards ``mini-00000{i}.tar`` splitting ``samples`` (interleaved) + classes.json; returns the pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_shard(root / f"mini-{i:06d}.tar", samples[i::n])
    (root / "classes.json").write_text(json.dumps({"classes": classes}))
    return str(root / f"mini-{{{0:06d}..{n - 1:06d}}}.tar")


def make_imagefolder(root: Path, samples: list[dict], classes: list[str]) -> Path:
    for s in samples:
        d = root / classes[s["label"]]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{s['key']}.jpg").write_bytes(s["jpg"])
    return root


def make_manifest(root: Path, samples: list[dict], classes: list[str], fmt: str = "jsonl") -> Path:
    """A manifest with image paths relative to it, captions and class-NAME labels."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        (root / "img" / f"{s['key']}.jpg").write_bytes(s["jpg"])
        rows.append({"image": f"img/{s['key']}.jpg", "caption": s["caption"], "label": classes[s["label"]]})
    path = root / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_webdataset_brace_pattern(tmp_path, mini_samples, cifar_classes):
    pattern = make_shards(tmp_path, mini_samples, cifar_classes)
    assert "{" in pattern
    src = open_source(pattern)
    assert src.kind == "webdataset" and len(src) == len(mini_samples) == 100
    assert src.class_names == cifar_classes  # from classes.json next to the shards
    order = mini_samples[0::2] + mini_samples[1::2]  # shard 0 then shard 1
    assert [r.key.split("/")[1] for r in src.refs] == [s["key"] for s in order]
    assert [r.label for r in src.refs] == [s["label"] for s in order]
    assert [r.caption for r in src.refs] == [s["caption"] for s in order]


def test_tar_index_matches_tarfile(tmp_path, mini_samples, data_dir):
    path = tmp_path / "a.tar"
    write_shard(path, mini_samples[:7])
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert tar_members(path) == expected
    # a GNU long name falls back to tarfile
    long = tmp_path / "long.tar"
    with tarfile.open(long, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("d" * 120 + "/x.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert [m[0] for m in tar_members(long)] == ["d" * 120 + "/x.jpg"]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert tar_members(empty) == []


def test_tar_header_checksums_checked_in_blocks(tmp_path, mini_samples, monkeypatch):
    """Header checksums are verified in bulk (numpy, in blocks of headers): a header whose bytes no longer match its
    checksum, in any block, sends the shard to tarfile's reader, which refuses it."""
    import retrofit.tar_shards as ts

    monkeypatch.setattr(ts, "_CHECK_ROWS", 4)  # several blocks for a 21-member shard
    path = tmp_path / "s-000.tar"
    write_shard(path, mini_samples[:7])
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert tar_members(path) == expected
    raw = bytearray(path.read_bytes())
    for which in (0, 5, 17):  # first block, a middle block, the last block
        bad = bytearray(raw)
        head = expected[which][1] - 512
        bad[head + 3] ^= 0x01  # one bit of the member's name: the stored checksum no longer matches
        broken = tmp_path / f"bad{which}-000.tar"
        broken.write_bytes(bytes(bad))
        with ts.open_shard(broken) as reader:
            assert ts._plain_members(reader) is None  # not trusted by the fast path
        with pytest.raises(ValueError, match=r"bad\d+-000\.tar is (not a readable tar file|damaged)"):
            webdataset_source(str(broken))


def test_imagefolder_templates(tmp_path, mini_samples, cifar_classes):
    root = make_imagefolder(tmp_path / "if", mini_samples, cifar_classes)
    src = imagefolder_source(root, templates=["a photo of a {}.", "a blurry photo of the {}."])
    assert len(src) == 100 and src.class_names == sorted(cifar_classes)
    for r in src.refs:
        name = src.class_names[r.label]
        assert r.key.startswith(name + "/")
        assert r.caption in (f"a photo of a {name}.", f"a blurry photo of the {name}.")
    assert sum(r.caption.startswith("a blurry") for r in src.refs) == 50
    with pytest.raises(ValueError, match="must each contain"):
        imagefolder_source(root, templates=["no placeholder"])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats(tmp_path, mini_samples, cifar_classes, fmt):
    path = make_manifest(tmp_path, mini_samples[:30], cifar_classes, fmt)
    src = manifest_source(path)
    assert len(src) == 30
    assert [r.caption for r in src.refs] == [s["caption"] for s in mini_samples[:30]]
    assert [r.label for r in src.refs] == [cifar_classes[s["label"]] for s in mini_samples[:30]]
    assert all(Path(r.image).is_file() for r in src.refs)
    with pytest.raises(ValueError, match="no 'picture' column"):
        manifest_source(path, image_col="picture")


def test_label_mapping_by_name(tmp_path, mini_samples, cifar_classes):
    src = webdataset_source(make_shards(tmp_path, mini_samples, cifar_classes))
    target = list(reversed(cifar_classes))  # a classifier with another class order
    labels, names = map_labels(src, [c.upper() for c in target])  # matching ignores case
    assert names == [c.upper() for c in target]
    assert [target[j] for j in labels] == [cifar_classes[r.label] for r in src.refs]
    with pytest.raises(ValueError, match=r"match no class.*'airplane'"):
        map_labels(src, [c for c in cifar_classes if c != "airplane"])
    # a manifest of class names without a class list: its labels' sorted set is the class order (as an
    # ImageFolder's folder names); it was refused, so that kb build / train needed --classes
    man = manifest_source(make_manifest(tmp_path / "m", mini_samples[:5], cifar_classes))
    labels, names = map_labels(man, None)
    assert names == sorted({cifar_classes[s["label"]] for s in mini_samples[:5]})
    assert [names[j] for j in labels] == [cifar_classes[s["label"]] for s in mini_samples[:5]]
    from retrofit.sources import SampleRef, Source

    mixed = Source("manifest", "m", [SampleRef("a", None, "x", "cat"), SampleRef("b", None, "x", 1)], None)
    with pytest.raises(ValueError, match="no class list"):  # numbers and names mixed: no order can be guessed
        map_labels(mixed, None)


def test_bad_configuration_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shards not found"):
        webdataset_source(str(tmp_path / "none-{000000..000002}.tar"))
    with pytest.raises(FileNotFoundError, match="data source .* not found"):
        open_source(str(tmp_path / "x.txt"))
    (tmp_path / "x.txt").write_text("not data")
    with pytest.raises(ValueError, match="cannot tell"):  # exists, but is no kind of source
        open_source(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "m.xml").write_text("<x/>")
        manifest_source(tmp_path / "m.xml")


class _WorkerMark:
    """A picklable preprocess that records which DataLoader worker ran it (fails in the main process)."""

    def __call__(self, im):
        info = torch.utils.data.get_worker_info()
        assert info is not None, "decoding ran in the main process"
        return torch.full((3, 4, 4), float(info.id + 1)) + 0 * torch.tensor(im.size).sum()


def test_decoding_runs_in_workers_and_reports_bad_data(tmp_path, mini_samples, cifar_classes):
    bad = dict(mini_samples[0], key="bad_jpeg", jpg=mini_samples[0]["jpg"][:40] + b"\x00" * 50)
    path = tmp_path / "s.tar"
    write_shard(path, mini_samples[:5] + [bad], extra=[("lonely.txt", b"a caption without an image")])
    src = webdataset_source(str(path), class_names=cifar_classes)
    ds = DecodeDataset(src.refs, _WorkerMark())
    pickle.dumps(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_decoded)
    batches = list(loader)
    index = [i for b in batches for i in b["index"]]
    assert index == list(range(7))  # order kept
    errors = {src.refs[i].key.split("/")[1]: e for b in batches for i, e in zip(b["index"], b["error"])}
    assert errors["bad_jpeg"].startswith("undecodable image")
    assert errors["lonely"] == "missing image member"
    assert all(errors[s["key"]] is None for s in mini_samples[:5])
    ok_vals = torch.cat([b["images"][:, 0, 0, 0] for b in batches if b["images"] is not None])
    assert set(ok_vals.tolist()) <= {1.0, 2.0} and len(ok_vals) == 5


def test_truncated_or_damaged_shards_are_refused(tmp_path, mini_samples):
    """A shard cut short lost its last samples (and a label: the .cls past the end became 'unknown'), one with a
    damaged header after the first member lost every later sample, both silently; both are refused now."""
    good = tmp_path / "good-000.tar"
    write_shard(good, mini_samples[:10])
    raw = good.read_bytes()
    assert len(tar_members(good)) == 30
    cut = tmp_path / "cut-000.tar"
    name, off, size = tar_members(good)[20]
    cut.write_bytes(raw[: off + size // 2])  # inside a member's data (tarfile pads the file with zero records)
    with pytest.raises(ValueError, match=r"shard .*cut-000\.tar is (truncated|damaged)"):
        webdataset_source(str(cut))
    first_end = 512 + (tar_members(good)[0][2] + 511) // 512 * 512
    junk = tmp_path / "junk-000.tar"
    junk.write_bytes(raw[:first_end] + bytes(range(256)) * 2 + raw[first_end + 512:])
    with pytest.raises(ValueError, match=r"shard .*junk-000\.tar is damaged: unreadable tar data at byte"):
        webdataset_source(str(junk))
    second = tar_members(good)[3]  # a writer killed between two members: the file ends at a header boundary
    edge = tmp_path / "edge-000.tar"
    edge.write_bytes(raw[: second[1] - 512])
    with pytest.raises(ValueError, match=r"edge-000\.tar is truncated: it ends after 3 members without"):
        webdataset_source(str(edge))
    not_tar = tmp_path / "text-000.tar"
    not_tar.write_text("these are not the shards you are looking for\n" * 20)
    with pytest.raises(ValueError, match="is not a readable tar file|is damaged"):
        webdataset_source(str(not_tar))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mini_samples):
    """PIL's convert('RGB') clips 16-bit greyscale at 255: a 16-bit PNG became an all-white image."""
    import numpy as np
    from PIL import Image

    from retrofit.sources import SampleRef

    grey = np.asarray(Image.open(io.BytesIO(mini_samples[0]["jpg"])).convert("L"), dtype=np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "a8.png")
    Image.fromarray((grey * 257).astype(np.uint16)).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    refs = [SampleRef(n, str(tmp_path / f"{n}.png"), None, None) for n in ("a8", "a16")]
    ds = DecodeDataset(refs, lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)))
    (_, x8, _, e8), (_, x16, _, e16) = ds[0], ds[1]
    assert e8 is None and e16 is None
    assert float((x16 - x8).abs().max()) <= 1.0 and float((x16 == 255).float().mean()) < 0.5


def test_exif_orientation_is_applied(tmp_path, mini_samples):
    """A phone's portrait JPEG is stored sideways with EXIF Orientation 6: it was decoded (and classified) sideways."""
    import numpy as np
    from PIL import Image

    from retrofit.sources import _to_rgb

    up = Image.open(io.BytesIO(mini_samples[0]["jpg"])).convert("RGB").resize((40, 24))  # landscape, upright
    stored = up.transpose(Image.Transpose.ROTATE_90)  # what the camera stores: the pixels turned
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as im:
        shown = _to_rgb(im)
    assert shown.size == up.size  # (40, 24): upright again
    assert float(np.abs(np.asarray(shown, float) - np.asarray(up, float)).mean()) < 12  # JPEG noise only
    for fmt in ("PNG", "JPEG"):  # an EXIF block PIL cannot parse: decoded as stored (reading it raised)
        buf = io.BytesIO()
        up.save(buf, fmt, exif=b"Exif\0\0not a TIFF header", **({"dpi": (72, 72)} if fmt == "JPEG" else {}))
        with Image.open(buf) as im:
            assert _to_rgb(im).size == up.size


def test_manifest_and_label_edge_cases(tmp_path, mini_samples, cifar_classes):
    """Excel's BOM, integer labels read back as floats, -1 as unknown with a class list, an out-of-range index
    caught before any work, a non-object JSONL line and a misspelt label column, each named."""
    from retrofit.sources import SampleRef, Source

    (tmp_path / "img").mkdir()
    rows = []
    for i, s in enumerate(mini_samples[:4]):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(s["jpg"])
        rows.append({"image": f"img/{i}.jpg", "caption": s["caption"] or "x", "label": s["label"]})
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeffimage,caption,label\n" + "".join(f"{r['image']},cap,{r['label']}\n" for r in rows),
                   encoding="utf-8")
    assert [r.label for r in manifest_source(bom).refs] == [r["label"] for r in rows]
    floats = tmp_path / "floats.jsonl"
    floats.write_text("".join(json.dumps({**r, "label": float(r["label"])}) + "\n" for r in rows[:3])
                      + json.dumps({**rows[3], "label": float("nan")}) + "\n")  # NaN: a gap in the column
    src = manifest_source(floats)
    assert [r.label for r in src.refs] == [r["label"] for r in rows[:3]] + [None]
    unknown = Source("manifest", "m", [SampleRef("a", None, "x", -1), SampleRef("b", None, "x", 0)], None)
    assert map_labels(unknown, cifar_classes)[0] == [-1, 0]
    wrong = Source("webdataset", "w", [SampleRef("s/k1", None, "x", 0), SampleRef("s/k2", None, "x", 5)], ["a", "b"])
    with pytest.raises(ValueError, match=r"sample s/k2 of w has label 5; allowed: -1 \(unknown\) or 0..1"):
        map_labels(wrong, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + '"just a string"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 must be a JSON object"):
        manifest_source(bad)
    with pytest.raises(ValueError, match="has no 'lable' column"):
        manifest_source(bom, label_col="lable")
    # columns under their usual other names are found; two candidates for one role are refused, naming both
    other = tmp_path / "other.csv"
    other.write_text("Path,Class,text\n" + "".join(f"{r['image']},{r['label']},cap {i}\n" for i, r in enumerate(rows)))
    src = manifest_source(other)
    assert [r.label for r in src.refs] == [r["label"] for r in rows] and src.refs[1].caption == "cap 1"
    assert all(Path(r.image).is_file() for r in src.refs) and src.options["columns"] == ["Path", "text", "Class"]
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("filename\n" + "".join(f"{r['image']}\n" for r in rows))
    src = manifest_source(unlabelled)
    assert [r.label for r in src.refs] == [None] * 4 and [r.caption for r in src.refs] == [None] * 4
    two = tmp_path / "two.csv"
    two.write_text("path,filename,label\n" + "".join(f"{r['image']},{r['image']},0\n" for r in rows))
    with pytest.raises(ValueError, match=r"columns \['path', 'filename'\] could each be the image column; name it "
                                         "with --image-column"):
        manifest_source(two)
    assert len(manifest_source(two, image_col="filename")) == 4
    # a column not found is recorded under its default name, as before columns were looked for: build ids hash
    # these options, and a build started before (a web manifest without labels) must resume, not be refused
    assert manifest_source(unlabelled).options["columns"] == ["filename", "caption", "label"]
    # training / evaluation data do not read captions: two caption-like columns are no reason to refuse them
    titled = tmp_path / "titled.csv"
    titled.write_text("image,label,title,description\n" + "".join(f"{r['image']},0,t,d\n" for r in rows))
    with pytest.raises(ValueError, match="could each be the caption column"):
        manifest_source(titled)
    assert [r.caption for r in manifest_source(titled, captions=False).refs] == [None] * 4
    # -1 (unknown) among class names still lets the names give the class list
    neg = tmp_path / "neg.csv"
    neg.write_text("image,label\n" + "".join(f"{r['image']},{'-1' if i == 0 else 'cat'}\n"
                                              for i, r in enumerate(rows)))
    assert map_labels(manifest_source(neg), None) == ([-1, 0, 0, 0], ["cat"])
    none = tmp_path / "none.csv"
    none.write_text("picture,label\n" + "".join(f"{r['image']},0\n" for r in rows))
    with pytest.raises(ValueError, match=r"has no image path column \(looked for \['image', 'path'.*--image-column"):
        manifest_source(none)
    boolean = tmp_path / "bool.jsonl"
    boolean.write_text(json.dumps({**rows[0], "label": True}) + "\n")
    with pytest.raises(ValueError, match="row 1: label True must be a class index or a class name"):
        manifest_source(boolean)


def test_class_lists_templates_and_folder_names(tmp_path, mini_samples):
    """classes.json as an index map (ImageNet's class index), BOM class files, templates with other braces, NFD
    folder names matched to NFC class names, hidden files inside class folders."""
    import unicodedata

    from retrofit.sources import read_class_names

    idx = tmp_path / "index.json"
    idx.write_text(json.dumps({"1": ["n02", "dog"], "0": ["n01", "cat"]}))
    assert read_class_names(idx) == ["n01", "n02"]  # ImageNet's folders are wnids (its names repeat: 'crane')
    idx.write_text(json.dumps({"1": "dog", "0": "cat"}))
    assert read_class_names(idx) == ["cat", "dog"]
    txt = tmp_path / "names.txt"
    txt.write_text("\ufeffcat\ndog\n", encoding="utf-8")
    assert read_class_names(txt) == ["cat", "dog"]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_class_names(broken)
    root = tmp_path / "folder"
    nfd = unicodedata.normalize("NFD", "café")
    (root / nfd / ".thumbs").mkdir(parents=True)
    (root / nfd / "a.jpg").write_bytes(mini_samples[0]["jpg"])
    (root / nfd / "._a.jpg").write_bytes(b"AppleDouble")
    (root / nfd / ".thumbs" / "t.jpg").write_bytes(mini_samples[1]["jpg"])
    src = imagefolder_source(root)
    assert [r.key for r in src.refs] == [f"{nfd}/a.jpg"]
    assert map_labels(src, ["café"])[0] == [0]
    for t in ("a {} and {}", "a {name} photo of {}"):
        with pytest.raises(ValueError, match="must hold exactly one"):
            imagefolder_source(root, templates=[t])


def test_encoder_specs_and_devices_are_checked_before_work():
    from retrofit.encoders import load_image_encoder
    from retrofit.ingest import BuildConfig

    with pytest.raises(ValueError, match="darknet-tiny input size must be at least 32 px, got 0"):
        load_image_encoder("darknet-tiny@0")
    with pytest.raises(ValueError, match=r"unknown torchvision weights 'NOPE'.*allowed: \['DEFAULT', 'IMAGENET1K_"):
        load_image_encoder("torchvision:resnet18@NOPE")
    with pytest.raises(ValueError, match="'nonsense' is not a device"):
        BuildConfig(device="nonsense").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            BuildConfig(device="cuda").validate()


def test_a_shard_cut_while_it_is_read_is_refused(tmp_path, mini_samples):
    """A shard truncated while it was listed was listed in part (the size read at open passed the end checks); with
    the earlier memory map it killed the process (SIGBUS). Refused now, as a shard cut before listing is."""
    import os

    import retrofit.tar_shards as ts

    path = tmp_path / "s-000.tar"
    write_shard(path, mini_samples[:40])
    full = tar_members(path)
    with ts.open_shard(path) as reader:
        reader.BLOCK = 1024  # several blocks for a small shard
        assert reader.read(0, 512)[:3] == full[0][0][:3].encode()
        os.truncate(path, path.stat().st_size // 2)
        with pytest.raises(ValueError, match=r"s-000\.tar got shorter while it was read .*copy or download it again"):
            ts.tar_members(path, reader)


def test_an_old_style_directory_entry_is_not_a_member(tmp_path):
    """A v7 directory entry (type '\\0', name ending in '/') was listed as an empty file; tarfile reads it as a
    directory."""
    path = tmp_path / "v7.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        d = tarfile.TarInfo("dd/")
        d.type = tarfile.AREGTYPE  # the old form: a regular-file type whose name ends in '/'
        tf.addfile(d)
        f = tarfile.TarInfo("dd/a.txt")
        f.size = 3
        tf.addfile(f, io.BytesIO(b"abc"))
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert tar_members(path) == expected == [("dd/a.txt", 1024, 3)]
