#!/usr/bin/env python3
"""Builds the fuzz targets' seed inputs from real ones: the protocol's golden frames, the
exchanges a master has with an agent (hand-encoded in postcard, as proto/PROTOCOL.md
describes), and small archives written with Python's tarfile and GNU tar.

Run from anywhere: python3 fuzz/seeds/make.py. Writes fuzz/seeds/{frame,request,unpack}/.
"""
import gzip
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE.parent.parent / "proto" / "tests" / "golden"


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(s):
    b = s.encode()
    return varint(len(b)) + b


def option(value):
    return b"\x00" if value is None else b"\x01" + value


def frame(body):
    return len(body).to_bytes(4, "big") + body


def write_file(path, mode, data, known=True):
    digest = hashlib.sha256(data).digest()
    request = b"\x02" + string(path) + varint(mode) + varint(len(data))
    request += option(digest if known else None)
    return frame(request) + frame(varint(0)) + data + frame(digest)


def unpack(archive, dest, sha=None):
    return frame(b"\x03" + string(archive) + string(dest) + option(sha))


def start(name, version, argv=(), env=(), user=None):
    body = b"\x04" + string(name) + string(version)
    body += varint(len(argv)) + b"".join(string(a) for a in argv)
    body += varint(len(env)) + b"".join(string(k) + string(v) for k, v in env)
    body += option(None if user is None else string(user))
    return frame(body)


def stop(name, grace_ms):
    return frame(b"\x05" + string(name) + varint(grace_ms))


PING = frame(b"\x01")


def tar_bytes(entries, fmt=tarfile.GNU_FORMAT, compress=True):
    """entries: (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def entry(name, kind=tarfile.REGTYPE, data=None, mode=0o644, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    if data is not None:
        info.size = len(data)
    return info, data


def archives():
    app = b"#!/bin/sh\nexec sleep 30\n"
    yield "plain", tar_bytes([entry("bin/", tarfile.DIRTYPE, mode=0o755),
                              entry("bin/app", data=app, mode=0o755),
                              entry("etc/app.conf", data=b"port = 8080\n")])
    yield "links", tar_bytes([entry("lib/", tarfile.DIRTYPE, mode=0o755),
                              entry("lib/a.so.1", data=b"\x7fELF"),
                              entry("lib/a.so", tarfile.SYMTYPE, link="a.so.1"),
                              entry("lib/b.so", tarfile.LNKTYPE, link="lib/a.so.1")])
    yield "longname", tar_bytes([entry("d/" + "n" * 150, data=b"long")])
    yield "pax", tar_bytes([entry("p/" + "x" * 120, data=b"pax")], fmt=tarfile.PAX_FORMAT)
    yield "ustar-uncompressed", tar_bytes([entry("u/file", data=b"u")],
                                          fmt=tarfile.USTAR_FORMAT, compress=False)
    yield "escape-dotdot", tar_bytes([entry("../escape", data=b"x")])
    yield "escape-absolute", tar_bytes([entry("/abs", data=b"x")])
    yield "escape-symlink", tar_bytes([entry("out", tarfile.SYMTYPE, link="../../.."),
                                       entry("out/x", data=b"x")])
    yield "escape-symlink-only", tar_bytes([entry("out", tarfile.SYMTYPE, link="../../..")])
    yield "setuid", tar_bytes([entry("s", data=b"x", mode=0o4755)])
    yield "fifo", tar_bytes([entry("f", tarfile.FIFOTYPE)])
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, "src")
        src.mkdir()
        with open(src / "sparse", "wb") as f:
            f.write(b"head")
            f.seek(64 * 1024)
            f.write(b"tail")
        (src / "small").write_bytes(b"gnu tar")
        for path in src.iterdir():
            os.utime(path, (0, 0))
        os.utime(src, (0, 0))
        out = pathlib.Path(tmp, "gnu.tar")
        subprocess.run(["tar", "--sparse", "--format=gnu", "-b1", "--owner=0", "--group=0",
                        "--numeric-owner", "--sort=name", "-cf", str(out),
                        "-C", str(src), "."], check=True)
        yield "gnu-sparse", gzip.compress(out.read_bytes(), mtime=0)


def clean(dir):
    shutil.rmtree(dir, ignore_errors=True)
    dir.mkdir(parents=True)
    return dir


def main():
    frames = clean(HERE / "frame")
    for golden in sorted(GOLDEN.glob("*.bin")):
        (frames / golden.stem).write_bytes(frame(golden.read_bytes()))
    (frames / "too-large").write_bytes((64 * 1024 + 1).to_bytes(4, "big"))

    arcs = dict(archives())
    unpacks = clean(HERE / "unpack")
    for name, data in arcs.items():
        (unpacks / name).write_bytes(data)

    requests = clean(HERE / "request")
    plain = arcs["plain"]
    sha = hashlib.sha256(plain).digest()
    seeds = {
        "ping": PING,
        "golden": b"".join(frame((GOLDEN / f"request_{n}.bin").read_bytes())
                           for n in ["ping", "stop", "hello"]),
        "write-file": write_file("etc/motd", 0o644, b"hello\n"),
        "write-file-unknown-digest": write_file("data/x", 0o600, b"abc" * 10, known=False),
        "write-file-cut": write_file("data/cut", 0o644, b"0123456789")[:-40],
        "deploy": write_file("archives/app-1.tar.gz", 0o644, plain)
        + unpack("archives/app-1.tar.gz", "releases/app/1", sha)
        + start("app", "1") + PING + stop("app", 100) + PING,
        "deploy-twice": write_file("archives/app-1.tar.gz", 0o644, plain)
        + unpack("archives/app-1.tar.gz", "releases/app/1")
        + unpack("archives/app-1.tar.gz", "releases/app/1", sha)
        + unpack("archives/app-1.tar.gz", "releases/app/2", bytes(32)),
        "start-argv": write_file("releases/web/2/run", 0o755, b"#!/bin/sh\nexit 0\n")
        + start("web", "2", ["run", "--port", "1"], [("A", "b")], "nobody") + stop("web", 0),
        "start-missing": start("ghost", "9") + stop("ghost", 5),
        "bad-names": start("../x", "1") + start("a", "..") + stop("", 1),
    }
    for name, data in seeds.items():
        (requests / name).write_bytes(data)
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"seeds written under {HERE}: {total} bytes")


if __name__ == "__main__":
    main()
