#!/usr/bin/env python3
"""Build .ortgpu/: onnxruntime-gpu 1.31.1 (CUDA 13, cp312, x86-64) small enough for the lent GPU machine.

Why: the lent H200 machine (Python 3.12, CUDA 13 libs, sm_90) cannot reach a package index and at most
64 MiB of working tree travels to it.  The onnxruntime-gpu wheel is 255 MB, almost all of it the fatbin
(.nv_fatbin) of libonnxruntime_providers_cuda.so: zstd-compressed cubins for sm_75/80/86/89/90a/120a.
This script packs what an H200 needs into ~34 MiB:

  * fatbin pruning: every fatbin container that holds an arch-90 cubin keeps only that entry; the other
    entries' payloads are zeroed in place (headers, offsets and sizes unchanged, so the ELF is untouched
    outside the payload bytes).  Containers without an arch-90 entry are left as they are.
  * the kept sm_90a zstd frames are zeroed too and shipped decompressed in one xz stream (512 MiB window:
    the cubins share a lot across kernels).  On the device, _ortgpu_restore/restore.py recompresses them
    with a bundled zstandard (cp312, libzstd 1.5.7) at level 19, which reproduces NVIDIA's frames byte
    for byte (checked here for every frame before relying on it), and checks the result's sha256.
  * dropped: the TensorRT provider, libonnxruntime.so.1.31.1 (C API only), transformers/, tools/,
    quantization/ and ThirdPartyNotices.txt.

Usage (from anywhere; needs python3.12 on PATH or --python, pip, network, xz, ~6 GB RAM, ~15 CPU-minutes):

    python3 bench/device/pack_onnxruntime_gpu.py [--out .ortgpu] [--jobs 2] [--download-dir DIR]

On the device: `. .ortgpu/install.sh` (unpacks to /tmp/ortsite, restores, sets PYTHONPATH and
LD_LIBRARY_PATH), then `python3 .ortgpu/smoke.py`.  smoke.onnx is written only if the interpreter running
this script can import onnx and numpy (e.g. the repo's .venv); otherwise it is skipped with a warning.
"""
import argparse, glob, hashlib, json, os, shutil, struct, subprocess, sys, tarfile, tempfile, zipfile

ORT, ZSTD = "onnxruntime-gpu==1.31.1", "zstandard==0.25.0"        # zstandard 0.25.0 bundles libzstd 1.5.7
CUDA_SO = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
DROP = ("onnxruntime/transformers/", "onnxruntime/tools/", "onnxruntime/quantization/",
        "onnxruntime/ThirdPartyNotices.txt", "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
        "onnxruntime/capi/libonnxruntime.so.1.31.1")
ARCH, ZSTD_FLAG, FATBIN_MAGIC = 90, 0x8000, 0xBA55ED50
EXPECT_SHA256 = "f7fe57b7b733297460eea5854dd382ad93b027122da846c5bb573a5f3689c82f"   # restored .so (1.31.1)
MAX_ARCHIVE = 40 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(*a):
    print("pack:", *a, flush=True)


def need(ok, what):
    """A check that survives `python -O`: stop with a clear message."""
    if not ok:
        raise SystemExit("pack: FAILED: " + what)


def is_zero(m):
    return bytes(m).count(0) == len(m)


def nv_fatbin(data):
    """(offset, size) of the .nv_fatbin section of an ELF64 little-endian file."""
    need(data[:6] == b"\x7fELF\x02\x01", "not an ELF64 LE file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sec = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = sec[shstrndx][4]
    for name, _, _, _, off, size in sec:
        if data[stroff + name:data.index(b"\0", stroff + name)] == b".nv_fatbin":
            return off, size
    raise SystemExit("pack: no .nv_fatbin section")


def parse_fatbin(d):
    """Containers (16-byte header: u32 magic, u16 version, u16 header size, u64 body size), each a list of
    entries.  Entry header (64 bytes, 112 for sm_120a): u16 kind, u16, u32 header size, u64 slot size,
    u32 compressed size, ..., u32 arch at +28, u64 flags at +40 (0x8000: zstd), u64 raw size at +56."""
    conts, p = [], 0
    while p < len(d):
        if d[p] == 0 and (p + 4 > len(d) or struct.unpack_from("<I", d, p)[0] != FATBIN_MAGIC):
            p += 1; continue                                       # zero padding between containers
        magic, _, hs, fs = struct.unpack_from("<IHHQ", d, p)
        need(magic == FATBIN_MAGIC, "bad fatbin magic at %#x" % p)
        ents, q, end = [], p + hs, p + hs + fs
        while q < end:
            kind, _, ehs, size, csize = struct.unpack_from("<HHIQI", d, q)
            arch, = struct.unpack_from("<I", d, q + 28)
            flags, _, dsize = struct.unpack_from("<QQQ", d, q + 40)
            ents.append(dict(off=q, kind=kind, arch=arch, flags=flags, csize=csize, dsize=dsize,
                             start=q + ehs, end=q + ehs + size, hdr=bytes(d[q:q + ehs])))
            q += ehs + size
        need(q == end, "fatbin container at %#x overruns" % p)
        conts.append(dict(off=p, hdr=bytes(d[p:p + hs]), ents=ents))
        p = end
    return conts


def prune(orig):
    """Pruned copy of the .so (only arch-90 entries kept where a container has one) and the kept entries."""
    off, size = nv_fatbin(orig)
    data = bytearray(orig)
    sec = memoryview(data)[off:off + size]
    conts = parse_fatbin(sec)
    kept = []
    for c in conts:
        if not any(e["arch"] == ARCH for e in c["ents"]):
            continue                                               # e.g. the 9 sm_120a-only containers
        for e in c["ents"]:
            if e["arch"] == ARCH:
                need(e["kind"] == 2 and e["flags"] & ZSTD_FLAG, "arch-90 entry is not a zstd cubin")
                need(is_zero(sec[e["start"] + e["csize"]:e["end"]]), "non-zero slot padding")
                kept.append(e)
            else:
                sec[e["start"]:e["end"]] = bytes(e["end"] - e["start"])
    del sec
    # verify: ELF outside the section unchanged, all headers unchanged, kept payloads equal, the rest zero
    need(data[:off] == orig[:off] and data[off + size:] == orig[off + size:], "bytes outside .nv_fatbin differ")
    a, b = memoryview(orig)[off:off + size], memoryview(data)[off:off + size]
    ca, cb = conts, parse_fatbin(b)
    keep = {e["off"] for e in kept}
    need(len(ca) == len(cb), "fatbin re-parse differs")
    nz = 0
    for x, y in zip(ca, cb):
        need((x["off"], x["hdr"]) == (y["off"], y["hdr"]) and len(x["ents"]) == len(y["ents"]), "fatbin re-parse differs")
        for ea, eb in zip(x["ents"], y["ents"]):
            need(ea["off"] == eb["off"] and ea["hdr"] == eb["hdr"], "entry header changed")
            s, t = ea["start"], ea["end"]
            full = ea["off"] in keep or not any(e["arch"] == ARCH for e in x["ents"])
            if full:
                need(bytes(a[s:t]) == bytes(b[s:t]), "kept payload changed")
            else:
                need(is_zero(b[s:t]), "zeroed payload not zero"); nz += 1
    log("fatbin: %d containers, %d arch-90 cubins kept, %d entries zeroed; verified" % (len(ca), len(kept), nz))
    return data, off, kept


# Run by the cp312 interpreter: decompress each kept frame, recompress it with the bundled zstandard and
# demand identical bytes (restore.py relies on that), and write the raw cubins in entry order.
WORKER = r'''
import json, sys
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, sys.argv[1])
import zstandard

def check(frame):
    raw = zstandard.ZstdDecompressor().decompress(frame)
    again = zstandard.ZstdCompressor(level=19, write_checksum=False, write_content_size=True).compress(raw)
    return raw, again == frame

if __name__ == "__main__":
    so, entries, out, jobs = sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4], int(sys.argv[5])
    data = open(so, "rb").read()
    bad = 0
    with ProcessPoolExecutor(jobs) as ex, open(out, "wb") as f:
        frames = [data[e["file_off"]:e["file_off"] + e["csize"]] for e in entries]
        for e, (raw, same) in zip(entries, ex.map(check, frames, chunksize=4)):
            if len(raw) != e["dsize"] or not same:
                bad += 1; print("MISMATCH at %#x" % e["file_off"], file=sys.stderr)
            f.write(raw)
    print(json.dumps({"zstd_version": list(zstandard.ZSTD_VERSION), "bad": bad}))
    sys.exit(1 if bad else 0)
'''


def xz(stdin, dst, filters):
    """xz-compress with the xz binary (2 threads at most, nice 5); `filters` are xz command-line options."""
    if not shutil.which("xz"):
        raise SystemExit("pack: the xz binary is needed (apt-get install xz-utils)")
    with open(dst, "wb") as f:
        return subprocess.Popen(["nice", "-n", "5", "xz", "-c", *filters], stdin=stdin, stdout=f)


def find_py312(given):
    """The given interpreter, else this one, python3.12, python3 or a pyenv 3.12, if it is CPython 3.12."""
    cands = [given] if given else [sys.executable, "python3.12", "python3"] + sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3")), reverse=True)
    for c in cands:
        try:
            if subprocess.run([c, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 12) or "
                               "sys.implementation.name != 'cpython')"], capture_output=True).returncode == 0:
                return c
        except OSError:
            pass
    raise SystemExit("pack: no CPython 3.12 found (tried %s); pass --python" % ", ".join(cands))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, ".ortgpu"))
    ap.add_argument("--download-dir", help="where the wheels go (reused if already there); default: temp")
    ap.add_argument("--python", help="a CPython 3.12 to run the bundled (cp312) zstandard (default: search)")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    args.python = find_py312(args.python)
    work = tempfile.mkdtemp(prefix="ortpack-")
    try:
        build(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(args, work):
    dl = args.download_dir or os.path.join(work, "dl")
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                           "-d", dl, ORT, ZSTD])
    whl = lambda pre: os.path.join(dl, next(n for n in sorted(os.listdir(dl)) if n.startswith(pre) and n.endswith(".whl")))
    stage, rdir = os.path.join(work, "stage"), os.path.join(work, "stage", "_ortgpu_restore")
    os.makedirs(os.path.join(rdir, "zstandard"))

    # 1. the wheel, less what the device does not need (file modes kept)
    with zipfile.ZipFile(whl("onnxruntime_gpu-1.31.1-")) as z:
        for i in z.infolist():
            if not i.filename.startswith(DROP) and not i.is_dir():
                p = z.extract(i, stage)
                os.chmod(p, (i.external_attr >> 16) & 0o777 or 0o644)
        orig = z.read(CUDA_SO)
    # 2. the bundled zstandard: its package __init__ and the (stripped) C backend only
    with zipfile.ZipFile(whl("zstandard-0.25.0-cp312-")) as z:
        be = "zstandard/backend_c.cpython-312-x86_64-linux-gnu.so"
        for n in ("zstandard/__init__.py", be):
            with z.open(n) as s, open(os.path.join(rdir, n), "wb") as d:
                shutil.copyfileobj(s, d)
    bep = os.path.join(rdir, be)
    if shutil.which("strip"):
        subprocess.check_call(["strip", "--strip-unneeded", bep])     # 11.5 MB -> 1 MB
    else:
        log("warning: no `strip`; shipping the unstripped zstandard backend (~3 MB more)")
    os.chmod(bep, 0o755)

    # 3. prune + verify the fatbin; the final (pruned) library's sha256 is what restore.py must reach
    data, off, kept = prune(orig)
    del orig
    final_sha = hashlib.sha256(data).hexdigest()
    log("pruned library sha256", final_sha, "= the 2026-11-30 build" if final_sha == EXPECT_SHA256 else
        "WARNING: differs from the 2026-11-30 build (%s...); the archive is still self-consistent" % EXPECT_SHA256[:16])
    entries = [dict(file_off=off + e["start"], csize=e["csize"], dsize=e["dsize"]) for e in kept]
    pruned_so = os.path.join(work, "pruned.so")
    with open(pruned_so, "wb") as f:
        f.write(data)
    with open(os.path.join(work, "entries.json"), "w") as f:
        json.dump(entries, f)

    # 4. check the bundled zstandard reproduces every kept frame; dump the raw cubins (~477 MB)
    with open(os.path.join(work, "worker.py"), "w") as f:
        f.write(WORKER)
    log("checking %d sm_90a frames with the bundled zstandard (%s, %d jobs; a few minutes)" % (len(entries), args.python, args.jobs))
    cub = os.path.join(work, "cubins.bin")
    r = subprocess.run(["nice", "-n", "5", args.python, os.path.join(work, "worker.py"), rdir, pruned_so,
                        os.path.join(work, "entries.json"), cub, str(args.jobs)], stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise SystemExit("pack: FAILED: bundled zstandard did not reproduce NVIDIA's frames (see above)")
    zver = json.loads(r.stdout.strip().splitlines()[-1])["zstd_version"]
    log("all %d frames reproduced byte for byte (libzstd %s)" % (len(entries), ".".join(map(str, zver))))
    with open(cub, "rb") as s:            # xz the cubins in the background while the skeleton is built
        cub_xz = xz(s, os.path.join(rdir, "cubins.bin.xz"), ["-T1", "--lzma2=preset=9,dict=512MiB"])

    # 5. the skeleton: the pruned library with the kept frames zeroed as well
    for e in entries:
        data[e["file_off"]:e["file_off"] + e["csize"]] = bytes(e["csize"])
    so_path = os.path.join(stage, CUDA_SO)
    with open(so_path, "wb") as f:
        f.write(data)
    os.chmod(so_path, 0o755)
    idx = dict(so=CUDA_SO, zstd_version=zver, sha256_skeleton=hashlib.sha256(data).hexdigest(),
               sha256_final=final_sha, entries=entries)
    del data
    with open(os.path.join(rdir, "index.json"), "w") as f:
        json.dump(idx, f)
    with open(os.path.join(rdir, "restore.py"), "w") as f:
        f.write(RESTORE_PY)
    if cub_xz.wait():
        raise SystemExit("pack: xz of the cubins failed")
    os.remove(cub); os.remove(pruned_so)

    # 6. the archive: tar (root-owned, sorted) piped into xz, BCJ x86 filter, 64 MiB dictionary, 2 threads
    os.makedirs(args.out, exist_ok=True)
    arc = os.path.join(args.out, "onnxruntime_gpu.tar.xz")
    log("writing", arc)
    p = xz(subprocess.PIPE, arc + ".tmp", ["-T%d" % min(2, args.jobs), "--x86", "--lzma2=preset=9,dict=64MiB"])
    def owner(t):
        t.uid = t.gid = 0; t.uname = t.gname = "root"; return t
    with tarfile.open(fileobj=p.stdin, mode="w|", format=tarfile.GNU_FORMAT) as t:
        t.add(stage, ".", recursive=False, filter=owner)
        for rel in sorted(os.path.relpath(os.path.join(r, n), stage) for r, ds, fs in os.walk(stage) for n in ds + fs):
            t.add(os.path.join(stage, rel), "./" + rel, recursive=False, filter=owner)
    p.stdin.close()
    if p.wait():
        raise SystemExit("pack: xz of the archive failed")
    os.replace(arc + ".tmp", arc)

    # 7. install.sh, smoke.py, smoke.onnx
    for name, text, mode in (("install.sh", INSTALL_SH, 0o755), ("smoke.py", SMOKE_PY, 0o644)):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(args.out, name), mode)
    write_smoke_onnx(os.path.join(args.out, "smoke.onnx"))
    size = os.path.getsize(arc)
    log("archive %s: %d bytes (%.1f MiB)" % (arc, size, size / 2**20))
    if size > MAX_ARCHIVE:
        raise SystemExit("pack: FAILED: archive over %d MiB" % (MAX_ARCHIVE >> 20))


def write_smoke_onnx(path):
    """MatMul(4x64 @ 64x64) + Add + Relu + LayerNormalization + Softmax, opset 17 (needs onnx + numpy)."""
    try:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper, save
    except ImportError:
        log("warning: onnx/numpy not importable here; smoke.onnx skipped (run with the repo's .venv python)")
        return
    r = np.random.default_rng(0)
    w = (r.standard_normal((64, 64)) * 0.1).astype(np.float32)
    b = (r.standard_normal(64) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (b, "B"), (np.ones(64, np.float32), "g"),
                                                         (np.zeros(64, np.float32), "b"))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g", "b"], ["l"], axis=-1, epsilon=1e-5),
             helper.make_node("Softmax", ["l"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "smoke", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


# Sourced on the device: unpack to /tmp/ortsite, restore, set PYTHONPATH / LD_LIBRARY_PATH.
INSTALL_SH = r'''# onnxruntime-gpu 1.31.1 (CUDA 13 build, fatbin pruned to sm_90a) for Python 3.12 / x86-64.
# Source it from the repository root:   . .ortgpu/install.sh
# It unpacks .ortgpu/onnxruntime_gpu.tar.xz into /tmp/ortsite, rebuilds the CUDA provider
# library there (the archive carries its sm_90a cubins uncompressed-then-xz'd; a bundled
# zstandard re-creates NVIDIA's exact zstd frames, checked by sha256), puts /tmp/ortsite first
# on PYTHONPATH (shadowing an installed CPU onnxruntime) and the pip nvidia-*/lib dirs on
# LD_LIBRARY_PATH, then prints onnxruntime's version, location and providers.
# No `set -e`: this file is sourced; errors return non-zero instead of killing the shell.

_ortgpu_install() {
    local site=/tmp/ortsite here arc stamp dirs
    here=$(cd "$(dirname "${BASH_SOURCE[0]:-.ortgpu/install.sh}")" && pwd) || return 1
    arc=$here/onnxruntime_gpu.tar.xz
    if [ ! -f "$arc" ]; then
        echo "ortgpu: $arc not found" >&2; return 1
    fi
    stamp=$(stat -c '%s %Y' "$arc")
    if [ ! -f "$site/.ortgpu_ok" ] || [ "$(cat "$site/.ortgpu_ok")" != "$stamp" ]; then
        echo "ortgpu: unpacking into $site" >&2
        rm -rf "$site" && mkdir -p "$site" || return 1
        if command -v xz >/dev/null 2>&1; then
            tar -xJf "$arc" -C "$site" || { echo "ortgpu: tar failed" >&2; return 1; }
        else
            python3 -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$arc" "$site" \
                || { echo "ortgpu: unpack failed" >&2; return 1; }
        fi
        python3 "$site/_ortgpu_restore/restore.py" || { echo "ortgpu: restore failed" >&2; return 1; }
        rm -f "$site/_ortgpu_restore/cubins.bin.xz"
        echo "$stamp" > "$site/.ortgpu_ok"
    fi

    case ":${PYTHONPATH:-}:" in
        *":$site:"*) ;;
        *) export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} ;;
    esac

    # nvidia/*/lib dirs of the pip nvidia-* packages (cu13/, cublas/, cuda_runtime/, curand/,
    # cudnn/, cufft/, nvjitlink/, ...) under the site-packages of the python3 in PATH.
    dirs=$(python3 - <<'PYEOF'
import glob, os, site, sys
roots = []
try:
    roots += site.getsitepackages()
except Exception:
    pass
try:
    roots.append(site.getusersitepackages())
except Exception:
    pass
roots += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
out = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib64"))):
        d = os.path.realpath(d)
        if os.path.isdir(d) and d not in out and glob.glob(os.path.join(d, "*.so*")):
            out.append(d)
print(":".join(out))
PYEOF
)
    if [ -n "$dirs" ]; then
        local d IFS=:
        for d in $dirs; do
            case ":${LD_LIBRARY_PATH:-}:" in
                *":$d:"*) ;;
                *) export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
            esac
        done
        echo "ortgpu: LD_LIBRARY_PATH += $dirs" >&2
    else
        echo "ortgpu: no nvidia/*/lib dirs found under python3's site-packages" >&2
    fi

    echo "ortgpu: in other shells use:  export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}  (and the LD_LIBRARY_PATH above)" >&2
    python3 -c "import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())"
}
_ortgpu_install
_ortgpu_rc=$?
unset -f _ortgpu_install
(exit $_ortgpu_rc)
'''


# _ortgpu_restore/restore.py inside the archive, run by install.sh.
RESTORE_PY = r'''#!/usr/bin/env python3
"""Rebuild onnxruntime/capi/libonnxruntime_providers_cuda.so (sm_90-pruned) from the skeleton
shipped in the archive plus the raw (decompressed) sm_90a cubins (cubins.bin.xz, in entry order).

The fatbin in the .so holds each cubin as a zstd frame; NVIDIA's frames are exactly what
libzstd 1.5.7 produces at level 19 (content size written, no checksum), checked for all 600
entries when the archive was made.  This script recompresses each raw cubin the same way,
checks the frame's length against the csize in its fatbin entry header, writes it into its
slot (offsets and sizes never change), then checks the sha256 of the whole file.
"""
import hashlib, json, lzma, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
SITE = os.path.dirname(HERE)
sys.path.insert(0, HERE)           # bundled zstandard (cp312 C backend, libzstd 1.5.7)
import zstandard

def main():
    idx = json.load(open(os.path.join(HERE, "index.json")))
    so = os.path.join(SITE, idx["so"])
    if tuple(zstandard.ZSTD_VERSION) != tuple(idx["zstd_version"]):
        sys.exit("restore: libzstd %s, need %s" % (zstandard.ZSTD_VERSION, idx["zstd_version"]))
    data = bytearray(open(so, "rb").read())
    if hashlib.sha256(data).hexdigest() == idx["sha256_final"]:
        print("restore: already done"); return
    if hashlib.sha256(data).hexdigest() != idx["sha256_skeleton"]:
        sys.exit("restore: skeleton sha256 mismatch")
    blob = lzma.open(os.path.join(HERE, "cubins.bin.xz"), "rb")
    entries = idx["entries"]
    raws = []
    for e in entries:
        raws.append(blob.read(e["dsize"]))
        assert len(raws[-1]) == e["dsize"]
    from concurrent.futures import ProcessPoolExecutor
    n = max(1, min(16, os.cpu_count() or 1))
    order = sorted(range(len(raws)), key=lambda i: -len(raws[i]))   # biggest first: better balance
    frames = [None] * len(raws)
    with ProcessPoolExecutor(n) as ex:
        for i, fr in zip(order, ex.map(_compress, [raws[i] for i in order], chunksize=1)):
            frames[i] = fr
    for e, fr in zip(entries, frames):
        if len(fr) != e["csize"]:
            sys.exit("restore: frame size mismatch at %#x (%d != %d)" % (e["file_off"], len(fr), e["csize"]))
        o = e["file_off"]
        assert data[o:o + e["csize"]].count(0) == e["csize"]
        data[o:o + e["csize"]] = fr
    h = hashlib.sha256(data).hexdigest()
    if h != idx["sha256_final"]:
        sys.exit("restore: final sha256 mismatch %s" % h)
    tmp = so + ".tmp"
    with open(tmp, "wb") as f: f.write(data)
    os.chmod(tmp, 0o755); os.replace(tmp, so)
    print("restore: %d sm_90a cubins written, sha256 %s OK" % (len(entries), h[:16]))

def _compress(raw):
    return zstandard.ZstdCompressor(level=19, write_checksum=False, write_content_size=True).compress(raw)

if __name__ == "__main__":
    main()
'''


# GPU smoke test, run on the device after install.sh.
SMOKE_PY = r'''"""GPU smoke test for the pruned onnxruntime-gpu: run after `. .ortgpu/install.sh`.
smoke.onnx = MatMul(4x64 @ 64x64) + Add + Relu + LayerNormalization + Softmax (opset 17).
Runs it on CUDAExecutionProvider with CPU fallback disabled (so every node's CUDA kernel,
i.e. sm_90a cubins from the pruned fatbin and cuBLAS, must load and run) and compares with CPU."""
import os, sys
import numpy as np
import onnxruntime as ort

m = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke.onnx")
x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
so = ort.SessionOptions()
so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
so.log_severity_level = 2
g = ort.InferenceSession(m, so, providers=["CUDAExecutionProvider"])
print("providers:", g.get_providers())
if g.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit("CUDAExecutionProvider not active")
y = g.run(None, {"x": x})[0]
r = ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
err = float(np.abs(y - r).max())
print("max |cuda - cpu| =", err)
sys.exit(0 if err < 1e-4 else 1)
'''


if __name__ == "__main__":
    main()
