#!/usr/bin/env python3
"""Build berth's integration-test images as OCI image layouts, offline.

Usage: python3 test-images/build.py OUTDIR [--big [MB]]

Every image is built from Debian's static busybox (/bin/busybox, package
busybox-static).  Output is deterministic: fixed mtimes, fixed ownership,
sorted entries, gzip mtime 0, canonical JSON.  Each image becomes an OCI
image layout directory OUTDIR/<name>/ (oci-layout, index.json,
blobs/sha256/...).  See test-images/README.md for what each image holds.

Only the Python standard library is used, plus the `zstd` command-line tool
for the zstd-compressed image.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile

BUSYBOX = "/bin/busybox"
MTIME = 1700000000
CREATED = "2023-11-14T22:13:20Z"  # == MTIME
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME = "org.opencontainers.image.ref.name"


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------
# tar layers
# --------------------------------------------------------------------------

class Entry:
    """One tar entry.  `name` is written literally (no normalisation)."""

    def __init__(self, name, kind="file", data=b"", mode=None, uid=0, gid=0,
                 linkname="", devmajor=0, devminor=0, xattrs=None):
        self.name = name
        self.kind = kind
        self.data = data
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs or {}


def d(name, mode=0o755, uid=0, gid=0):
    return Entry(name.rstrip("/") + "/", "dir", mode=mode, uid=uid, gid=gid)


def f(name, data, mode=0o644, uid=0, gid=0, xattrs=None):
    if isinstance(data, str):
        data = data.encode()
    return Entry(name, "file", data=data, mode=mode, uid=uid, gid=gid,
                 xattrs=xattrs)


def sym(name, target):
    return Entry(name, "symlink", linkname=target, mode=0o777)


def hard(name, target):
    return Entry(name, "hardlink", linkname=target, mode=0o644)


TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
}


def make_tar(entries):
    """Uncompressed tar bytes, entries in the given order, names verbatim."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8") as tar:
        for e in entries:
            ti = tarfile.TarInfo()
            # Assigning .name directly bypasses all of tarfile's name
            # normalisation (no lstrip("/"), no "../" handling).
            ti.name = e.name
            ti.type = TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else (
                0o755 if e.kind == "dir" else 0o644)
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname = ti.gname = ""
            ti.mtime = MTIME
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.xattrs:
                ti.pax_headers = {
                    "SCHILY.xattr." + k: v for k, v in sorted(e.xattrs.items())
                }
            if e.kind == "file":
                ti.size = len(e.data)
                tar.addfile(ti, io.BytesIO(e.data))
            else:
                ti.size = 0
                tar.addfile(ti)
    return buf.getvalue()


def compress(raw, how, level=6):
    if how == "gzip":
        # mtime=0 and no file name => reproducible header.
        return gzip.compress(raw, compresslevel=level, mtime=0), MT_LAYER_GZIP
    if how == "zstd":
        if shutil.which("zstd") is None:
            sys.exit("build.py: the `zstd` command is required "
                     "(apt-get install zstd)")
        out = subprocess.run(["zstd", "-q", "-c", "-10", "--no-progress"],
                             input=raw, stdout=subprocess.PIPE, check=True)
        return out.stdout, MT_LAYER_ZSTD
    if how == "none":
        return raw, MT_LAYER_TAR
    raise ValueError(how)


def decompress(blob, media_type):
    if media_type == MT_LAYER_GZIP:
        return gzip.decompress(blob)
    if media_type == MT_LAYER_ZSTD:
        return subprocess.run(["zstd", "-q", "-d", "-c"], input=blob,
                              stdout=subprocess.PIPE, check=True).stdout
    if media_type == MT_LAYER_TAR:
        return blob
    raise ValueError(media_type)


class Layer:
    def __init__(self, entries, how="gzip", comment="", level=6):
        self.raw = make_tar(entries)
        self.blob, self.media_type = compress(self.raw, how, level)
        self.diff_id = "sha256:" + sha256_hex(self.raw)
        self.comment = comment


# --------------------------------------------------------------------------
# OCI layout writing
# --------------------------------------------------------------------------

class Layout:
    def __init__(self, path):
        self.path = path
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(os.path.join(path, "blobs", "sha256"))

    def blob(self, data, media_type, **extra):
        hexd = sha256_hex(data)
        p = os.path.join(self.path, "blobs", "sha256", hexd)
        if not os.path.exists(p):
            with open(p, "wb") as fh:
                fh.write(data)
        desc = {"mediaType": media_type, "digest": "sha256:" + hexd,
                "size": len(data)}
        desc.update(extra)
        return desc

    def image(self, layers, arch="amd64", variant=None, user=None,
              cmd=("sh",), **extra):
        """Write config + manifest blobs; return the manifest descriptor."""
        cfg = {"Env": [PATH_ENV], "Cmd": list(cmd)}
        if user is not None:
            cfg["User"] = user
        config = {
            "created": CREATED,
            "architecture": arch,
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers",
                       "diff_ids": [l.diff_id for l in layers]},
            "history": [{"created": CREATED,
                         "created_by": "berth test-images/build.py: "
                                       + (l.comment or "layer")}
                        for l in layers],
        }
        if variant:
            config["variant"] = variant
        config_desc = self.blob(canonical_json(config), MT_CONFIG)
        layer_descs = [self.blob(l.blob, l.media_type) for l in layers]
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                    "config": config_desc, "layers": layer_descs}
        return self.blob(canonical_json(manifest), MT_MANIFEST, **extra)

    def index_blob(self, manifests, **extra):
        idx = {"schemaVersion": 2, "mediaType": MT_INDEX,
               "manifests": manifests}
        return self.blob(canonical_json(idx), MT_INDEX, **extra)

    def finish(self, top_descriptor, ref="latest"):
        top = dict(top_descriptor)
        top["annotations"] = {REF_NAME: ref}
        index = {"schemaVersion": 2, "mediaType": MT_INDEX,
                 "manifests": [top]}
        with open(os.path.join(self.path, "index.json"), "wb") as fh:
            fh.write(canonical_json(index))
        with open(os.path.join(self.path, "oci-layout"), "wb") as fh:
            fh.write(canonical_json({"imageLayoutVersion": "1.0.0"}))


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def read_blob(layout, desc):
    algo, hexd = desc["digest"].split(":", 1)
    assert algo == "sha256", desc
    p = os.path.join(layout, "blobs", "sha256", hexd)
    with open(p, "rb") as fh:
        data = fh.read()
    if sha256_hex(data) != hexd:
        raise AssertionError(f"{p}: digest mismatch")
    if len(data) != desc["size"]:
        raise AssertionError(f"{p}: size {len(data)} != {desc['size']}")
    return data


def validate_descriptor(layout, desc):
    data = read_blob(layout, desc)
    doc = json.loads(data)
    assert doc.get("mediaType") == desc["mediaType"], (layout, desc)
    if desc["mediaType"] == MT_INDEX:
        assert doc["manifests"], layout
        for m in doc["manifests"]:
            validate_descriptor(layout, m)
    elif desc["mediaType"] == MT_MANIFEST:
        config = json.loads(read_blob(layout, doc["config"]))
        diff_ids = config["rootfs"]["diff_ids"]
        assert len(diff_ids) == len(doc["layers"]), layout
        for ld, diff_id in zip(doc["layers"], diff_ids):
            raw = decompress(read_blob(layout, ld), ld["mediaType"])
            if "sha256:" + sha256_hex(raw) != diff_id:
                raise AssertionError(f"{layout}: diff_id mismatch {diff_id}")
        if "platform" in desc:
            p = desc["platform"]
            assert p["architecture"] == config["architecture"], layout
            assert p.get("variant") == config.get("variant"), layout
    else:
        raise AssertionError(f"{layout}: unexpected {desc['mediaType']}")


def validate_layout(layout):
    with open(os.path.join(layout, "oci-layout")) as fh:
        assert json.load(fh)["imageLayoutVersion"] == "1.0.0"
    with open(os.path.join(layout, "index.json")) as fh:
        index = json.load(fh)
    assert index["schemaVersion"] == 2
    assert len(index["manifests"]) == 1, layout
    top = index["manifests"][0]
    assert top["annotations"][REF_NAME] == "latest", layout
    validate_descriptor(layout, top)


# --------------------------------------------------------------------------
# image contents
# --------------------------------------------------------------------------

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""

GROUP = """\
root:x:0:
daemon:x:1:
app:x:1000:
extra:x:2000:app
nogroup:x:65534:
"""


def busybox_applets():
    out = subprocess.run([BUSYBOX, "--list"], stdout=subprocess.PIPE,
                         check=True, text=True).stdout
    names = sorted({a.strip() for a in out.split() if a.strip()})
    return [a for a in names if a != "busybox" and "/" not in a]


def busybox_entries(busybox_bytes):
    entries = [
        d("bin"), d("dev"), d("etc"), d("home"),
        d("home/app", uid=1000, gid=1000),
        d("proc", mode=0o555), d("root", mode=0o700), d("sys", mode=0o555),
        d("tmp", mode=0o1777), d("usr"), d("usr/bin"), d("usr/sbin"),
        d("var"),
        f("bin/busybox", busybox_bytes, mode=0o755),
        f("etc/passwd", PASSWD),
        f("etc/group", GROUP),
        f("etc/hostname", "berth-test\n"),
    ]
    for a in busybox_applets():
        entries.append(sym("bin/" + a, "busybox"))
    entries.sort(key=lambda e: e.name)
    return entries


def euid_elf():
    """A minimal static x86_64 ELF: exit(geteuid())."""
    return tiny_elf(bytes.fromhex("b86b0000000f0589c7b83c0000000f05"))


def keyctl_probe_elf():
    """keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): exits 0
    on success, else with the errno."""
    code = bytes.fromhex(
        "b8fa000000"    # mov eax, 250 (keyctl)
        "bf00000000"    # mov edi, 0 (KEYCTL_GET_KEYRING_ID)
        "befdffffff"    # mov esi, -3 (KEY_SPEC_SESSION_KEYRING)
        "31d2"          # xor edx, edx
        "0f05"          # syscall
        "85c0"          # test eax, eax
        "7802"          # js +2: keep a negative errno
        "31c0"          # xor eax, eax: success exits 0
        "f7d8"          # neg eax
        "89c7"          # mov edi, eax
        "b83c000000"    # mov eax, 60 (exit)
        "0f05")         # syscall
    return tiny_elf(code)


def tiny_elf(code):
    """A static x86_64 ELF whose only segment is `code`."""
    base, off = 0x400000, 64 + 56
    total = off + len(code)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) +
            struct.pack("<HHIQQQIHHHHHH", 2, 0x3e, 1, base + off, 64, 0, 0,
                        64, 56, 1, 0, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total,
                       0x1000)
    return ehdr + phdr + code


def build_all(out, busybox_bytes, log):
    built = []
    bb = Layer(busybox_entries(busybox_bytes), comment="busybox")

    def simple(name, layers, **kw):
        lay = Layout(os.path.join(out, name))
        lay.finish(lay.image(layers, **kw))
        built.append(name)
        log(name, layers)

    # busybox ------------------------------------------------------------
    simple("busybox", [bb])

    # multiarch ----------------------------------------------------------
    lay = Layout(os.path.join(out, "multiarch"))
    descs = []
    arch_layers = []
    for arch, variant in (("amd64", None), ("arm64", None), ("arm", "v7")):
        label = arch + ("/" + variant if variant else "")
        al = Layer([f("arch", label + "\n")], comment="arch " + label)
        arch_layers.append(al)
        platform = {"architecture": arch, "os": "linux"}
        if variant:
            platform["variant"] = variant
        descs.append(lay.image([bb, al], arch=arch, variant=variant,
                               platform=platform))
    lay.finish(lay.index_blob(descs))
    built.append("multiarch")
    log("multiarch", [bb] + arch_layers, "index of linux/amd64, linux/arm64, "
        "linux/arm/v7")

    # users --------------------------------------------------------------
    simple("user-numeric", [bb], user="1000:1000")
    simple("user-named", [bb], user="app")

    simple("user-name-group", [bb], user="app:extra")

    # security -----------------------------------------------------------
    # /bin/euid: a setuid-root program exiting with its effective uid (mod
    # 256), to see whether no_new_privs stops the gain.
    # /bin/keyctl-probe: exits 0 if keyctl works, else with its errno (1,
    # EPERM, when a seccomp filter refuses it).
    sec = Layer([d("bin"), f("bin/euid", euid_elf(), mode=0o4755),
                 f("bin/keyctl-probe", keyctl_probe_elf(), mode=0o755)],
                comment="setuid euid probe, keyctl probe")
    simple("security", [bb, sec])

    # zstd ---------------------------------------------------------------
    zbb = Layer(busybox_entries(busybox_bytes), how="zstd", comment="busybox")
    zmark = Layer([f("zstd-marker", "zstd\n")], how="zstd",
                  comment="zstd marker")
    simple("zstd", [zbb, zmark])

    # uncompressed -------------------------------------------------------
    ubb = Layer(busybox_entries(busybox_bytes), how="none", comment="busybox")
    simple("uncompressed", [ubb])

    # layered ------------------------------------------------------------
    l2 = Layer([
        d("bin"),
        f("bin/suid-test", "x", mode=0o4755),
        d("data"),
        f("data/a", "a\n", xattrs={"user.berth": "test"}),
        f("data/b", "b\n"),
        Entry("data/fifo", "fifo", mode=0o644),
        hard("data/hard", "data/a"),
        sym("data/link", "a"),
        d("data/sub"),
        f("data/sub/c", "c\n"),
        d("home"),
        d("home/app", uid=1000, gid=1000),
        f("home/app/owned", "owned by app\n", uid=1000, gid=1000),
        d("keep"),
        f("keep/x", "x\n"),
    ], comment="files, links, fifo, suid, owner, xattr")
    l3 = Layer([
        d("data"),
        f("data/.wh.b", ""),
        d("keep"),
        f("keep/.wh..wh..opq", ""),
        f("keep/y", "y\n"),
    ], comment="whiteout data/b, opaque keep/")
    l4 = Layer([d("data"), f("data/new", "new\n")], comment="add data/new")
    simple("layered", [bb, l2, l3, l4])

    # devnode ------------------------------------------------------------
    dev = Layer([
        d("dev"),
        Entry("dev/evil-null", "chr", mode=0o666, devmajor=1, devminor=3),
        Entry("dev/evil-sda", "blk", mode=0o660, devmajor=8, devminor=0),
        f("devnode-ok", "ok\n"),
    ], comment="device nodes")
    simple("devnode", [bb, dev])

    # evil ---------------------------------------------------------------
    pwned = "pwned\n"
    simple("evil-abs", [bb, Layer([f("/evil-abs-pwned", pwned)],
                                  comment="absolute path")])
    simple("evil-dotdot", [bb, Layer(
        [f("../../../../tmp/evil-dotdot-pwned", pwned)], comment="dotdot")])
    simple("evil-symlink", [bb, Layer([
        sym("escape", "/tmp"),
        f("escape/evil-symlink-pwned", pwned),
    ], comment="write through symlink")])
    simple("evil-symlink-lower", [
        bb,
        Layer([sym("escape", "/tmp")], comment="symlink escape -> /tmp"),
        Layer([f("escape/evil-lower-pwned", pwned)],
              comment="write through lower-layer symlink"),
    ])
    simple("evil-hardlink", [bb, Layer([hard("passwd-link", "/etc/passwd")],
                                       comment="absolute hardlink")])
    simple("evil-hardlink-dotdot", [bb, Layer(
        [hard("x", "../../../../etc/passwd")], comment="dotdot hardlink")])

    # volume-data: one layer, no busybox, for image volumes (a bind of the
    # single layer) and their sub paths, including ones that escape.
    big = bytes(range(256)) * (4 * 4096)
    simple("volume-data", [Layer([
        d("data"),
        f("data/hello", "hello from an image volume\n"),
        d("data/sub"),
        f("data/sub/c", "c\n"),
        f("data/big", big),
        sym("data/rel", "sub"),
        sym("data/up", "../.."),
        sym("data/abs", "/etc"),
    ], comment="image volume data, escaping symlinks")])

    # Mount targets that are symlinks to host locations: berth must resolve
    # them inside the rootfs (tests/breakout.rs).
    simple("evil-mounts", [bb, Layer([
        d("etc"),
        sym("etc/resolv.conf", "/etc/shadow"),
        sym("etc/hosts", "../../../../../../../../tmp/berth-evil-hosts"),
        sym("vol", "/"),
        sym("mask", "../../../../../../../../etc"),
    ], comment="mount targets as symlinks to host paths")])

    return built


def build_big(out, mb, busybox_bytes, log):
    """busybox + ~mb MiB of random-ish text in 5 gzip layers (deterministic)."""
    rng = random.Random(0xBE27)
    alphabet = (b"abcdefghijklmnopqrstuvwxyz"
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n")
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    total = mb * 1024 * 1024
    nlayers = 5
    file_size = 4 * 1024 * 1024
    layers = [Layer(busybox_entries(busybox_bytes), comment="busybox")]
    for li in range(nlayers):
        remaining = total // nlayers
        entries = [d("big"), d(f"big/{li}")]
        fi = 0
        while remaining > 0:
            n = min(file_size, remaining)
            data = rng.randbytes(n).translate(table)
            entries.append(f(f"big/{li}/{fi:05d}.txt", data))
            remaining -= n
            fi += 1
        layers.append(Layer(entries, level=1, comment=f"big layer {li}"))
        del entries
    lay = Layout(os.path.join(out, "big"))
    lay.finish(lay.image(layers, cmd=("sh",)))
    log("big", layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--big", nargs="?", type=int, const=500, default=None,
                    metavar="MB",
                    help="also build `big` (~MB MiB, default 500)")
    ap.add_argument("--force", action="store_true",
                    help="rebuild even if the stamp matches")
    args = ap.parse_args()

    if not os.path.exists(BUSYBOX):
        sys.exit(f"build.py: {BUSYBOX} not found "
                 "(apt-get install busybox-static)")
    with open(BUSYBOX, "rb") as fh:
        busybox_bytes = fh.read()
    with open(os.path.abspath(__file__), "rb") as fh:
        script_bytes = fh.read()
    h = hashlib.sha256()
    h.update(script_bytes)
    h.update(b"\0")
    h.update(busybox_bytes)
    stamp_value = h.hexdigest() + "\n"

    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)

    def log(name, layers, extra=""):
        total = sum(len(l.blob) for l in layers)
        kinds = ",".join(sorted({l.media_type.rsplit(".", 1)[-1]
                                 for l in layers}))
        msg = f"built {name}: {len(layers)} layer(s) [{kinds}], {total} bytes"
        if extra:
            msg += f" ({extra})"
        print(msg, flush=True)

    stamp = os.path.join(out, ".stamp")
    if not args.force and read_file(stamp) == stamp_value:
        print(f"test images in {out} are up to date")
    else:
        if os.path.exists(stamp):
            os.unlink(stamp)
        names = build_all(out, busybox_bytes, log)
        for name in names:
            validate_layout(os.path.join(out, name))
        write_file(stamp, stamp_value)
        print(f"validated {len(names)} layouts in {out}")

    if args.big is not None:
        big_stamp = os.path.join(out, ".stamp-big")
        big_value = f"{stamp_value.strip()} {args.big}\n"
        if not args.force and read_file(big_stamp) == big_value:
            print("big is up to date")
        else:
            if os.path.exists(big_stamp):
                os.unlink(big_stamp)
            build_big(out, args.big, busybox_bytes, log)
            validate_layout(os.path.join(out, "big"))
            write_file(big_stamp, big_value)
            print("validated big")


def read_file(p):
    try:
        with open(p) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def write_file(p, content):
    tmp = p + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(content)
    os.replace(tmp, p)


if __name__ == "__main__":
    main()
