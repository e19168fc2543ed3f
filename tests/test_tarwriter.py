"""The shard tar writer produces archives that tarfile and webdataset read back byte for byte."""

import tarfile

import webdataset as wds

from fashionlabel.tarwriter import TarWriter


def test_round_trip_with_long_names(tmp_path):
    members = {
        "a1.jpg": b"\xff\xd8" + bytes(range(256)) * 3,
        "a1.json": b'{"x": 1}',
        "b.jpg": b"",
        "k" * 128 + ".json": b"x" * 512,
        "k" * 128 + ".jpg": b"y" * 513,
    }
    path = tmp_path / "s.tar"
    with TarWriter(open(path, "wb")) as tar:  # noqa: SIM115
        for n, d in members.items():
            tar.add(n, d)
    with tarfile.open(path) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar}
        assert all(m.mode == 0o444 and m.mtime == 0 and m.isfile() for m in tar.getmembers())
    assert got == members
    # POSIX ends an archive with two zero blocks (one alone, GNU tar reports "A lone zero block"), and the
    # fixed metadata makes the same members the same bytes
    data = path.read_bytes()
    assert len(data) % 512 == 0 and data.endswith(b"\0" * 1024) and data[-1536:-1024].strip(b"\0")
    again = tmp_path / "again.tar"
    with TarWriter(open(again, "wb")) as tar:  # noqa: SIM115
        for n, d in members.items():
            tar.add(n, d)
    assert again.read_bytes() == data
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a1", "b", "k" * 128]
    assert samples[2]["jpg"] == b"y" * 513
