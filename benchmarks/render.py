"""JPEG rendering benchmark: dicomgate's engine beside DCMTK dcmj2pnm and Orthanc.

Renders per second of one 512 x 512 16-bit CT slice and one 3000 x 3000 16-bit CR
image (both generated here, smooth anatomy-like content plus noise), to JPEG at
quality 90, by:

* dicomgate: ``render_jpeg()`` in this process, N times in a row;
* DCMTK: ``dcmj2pnm +oj`` started N times (one process per render, so the figure
  includes process start-up and reading the file);
* Orthanc: ``GET /instances/{id}/preview`` with ``Accept: image/jpeg``, N times over
  one keep-alive HTTP connection to a temporary Orthanc (loopback, free ports).

Windows: the CT carries one (40/400, HU rescale): dicomgate uses it, dcmj2pnm gets
``+Wi 1``. The CR (MONOCHROME1) carries none: dicomgate uses its automatic min-max
window, dcmj2pnm gets ``+Wm``. Orthanc chooses by itself. See benchmarks/README.md.

    .venv/bin/python benchmarks/render.py                 # ~1 minute
    .venv/bin/python benchmarks/render.py --ct 500 --cr 50 --json benchmarks/.work/render.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402
from _peers import Orthanc, proc_status, reset_peak  # noqa: E402

HERE = Path(__file__).resolve().parent
DCMJ2PNM = Path("/usr/bin/dcmj2pnm")
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


# --------------------------------------------------------------------------- data

def _anatomy(size: int, seed: int) -> np.ndarray:
    """A size x size float32 image: a body ellipse with a smooth gradient, two darker
    lungs, a brighter spine and ribs-like bands, and Gaussian noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2 < 1
    lungs = (((x - 0.3) / 0.12) ** 2 + ((y - 0.45) / 0.2) ** 2 < 1) | \
        (((x - 0.7) / 0.12) ** 2 + ((y - 0.45) / 0.2) ** 2 < 1)
    spine = (np.abs(x - 0.5) < 0.035) & (np.abs(y - 0.55) < 0.3)
    ribs = (np.sin(y * 60) > 0.85) & body & ~lungs
    image = np.zeros((size, size), np.float32)
    image[body] = 1040 + 60 * np.sin(x * 7)[body] + 40 * np.cos(y * 5)[body]
    image[lungs] = 250 + 80 * y[lungs]
    image[ribs] = 1500
    image[spine] = 1900
    image += rng.normal(0, 18, (size, size)).astype(np.float32)
    return image


def _dataset(sop_class: str, name: str, modality: str, pixels: np.ndarray, photometric: str):
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _peers._base_dataset(sop_class, _peers.bench_uid(f"render-{name}"), modality,
                              patient=1, study=1, series=1, instance=1,
                              series_description=f"RENDER {name.upper()}",
                              study_description="RENDER BENCHMARK")
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_ct(path: Path) -> None:
    """512 x 512, 16 bits allocated, 12 stored, HU rescale, window 40/400."""
    stored = np.clip(np.rint(_anatomy(512, 1)), 0, 4095).astype(np.uint16)
    ds = _dataset(_peers.CT_IMAGE_STORAGE, "ct", "CT", stored, "MONOCHROME2")
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.save_as(path, enforce_file_format=True)


def write_cr(path: Path) -> None:
    """3000 x 3000, 16 bits allocated, 12 stored, MONOCHROME1 (high values are dark),
    no window."""
    stored = np.clip(np.rint(4095 - 1.8 * _anatomy(3000, 2)), 0, 4095).astype(np.uint16)
    ds = _dataset(CR_STORAGE, "cr", "CR", stored, "MONOCHROME1")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------- renderers

def bench_dicomgate(path: Path, count: int, max_size: int = 0) -> dict:
    """In a child process of its own, so that its memory figure is that of rendering
    only (after the imports) and not of what an earlier case left allocated."""
    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(count),
                          str(max_size)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(path: Path, count: int, max_size: int) -> dict:
    from dicomgate.plugins.jpeg.render import RenderOptions, render_jpeg

    options = RenderOptions(quality=90, max_size=max_size)
    pid = os.getpid()
    before = proc_status(pid).get("VmRSS", 0)
    peak_reset = reset_peak(pid)
    for _ in range(3):  # warm-up: decoder set-up, page cache
        images = render_jpeg(path, options)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        images = render_jpeg(path, options)
        times.append(time.perf_counter() - start)
    peak = proc_status(pid).get("VmHWM", 0)
    return {"renders": count, "seconds": sum(times), "median_ms": statistics.median(times) * 1e3,
            "jpeg_bytes": len(images[0].data), "size": [images[0].width, images[0].height],
            "rss_before_mb": before / 1024, "peak_growth_mb":
                (peak - before) / 1024 if peak_reset else None}


def bench_dcmtk(path: Path, count: int, voi: list[str], out: Path) -> dict:
    cmd = [str(DCMJ2PNM), "+oj", "+Jq", "90", *voi, str(path), str(out)]
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up
    times = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"renders": count, "seconds": sum(times), "median_ms": statistics.median(times) * 1e3,
            "jpeg_bytes": out.stat().st_size, "command": " ".join(cmd)}


class OrthancPreview:
    """A temporary Orthanc holding the files, asked for JPEG previews over HTTP."""

    def __init__(self, workdir: Path):
        self.server = Orthanc(workdir)

    def __enter__(self) -> OrthancPreview:
        self.server.start()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()
        self.server.stop()

    def upload(self, path: Path) -> str:
        self.conn.request("POST", "/instances", body=path.read_bytes(),
                          headers={"Content-Type": "application/dicom"})
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"Orthanc refused {path.name}: {response.status} {body[:200]!r}")
        return json.loads(body)["ID"]

    def preview(self, instance: str) -> bytes:
        self.conn.request("GET", f"/instances/{instance}/preview",
                          headers={"Accept": "image/jpeg"})
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200 or response.getheader("Content-Type") != "image/jpeg":
            raise RuntimeError(f"Orthanc preview: {response.status} "
                               f"{response.getheader('Content-Type')} {body[:200]!r}")
        return body

    def bench(self, instance: str, count: int) -> dict:
        data = self.preview(instance)  # warm-up
        times = []
        for _ in range(count):
            start = time.perf_counter()
            data = self.preview(instance)
            times.append(time.perf_counter() - start)
        return {"renders": count, "seconds": sum(times),
                "median_ms": statistics.median(times) * 1e3, "jpeg_bytes": len(data)}


# --------------------------------------------------------------------------- report

def rate(result: dict | None) -> float | None:
    if not result or not result.get("seconds"):
        return None
    return result["renders"] / result["seconds"]


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct", type=int, default=200, help="renders of the CT per renderer")
    parser.add_argument("--cr", type=int, default=20, help="renders of the CR per renderer")
    parser.add_argument("--peers", default="dcmtk,orthanc",
                        help="comma-separated: dcmtk, orthanc (empty: dicomgate only)")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "render")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    _peers.install_cleanup()

    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {"ct": args.workdir / "ct-512.dcm", "cr": args.workdir / "cr-3000.dcm"}
    if not files["ct"].exists():
        write_ct(files["ct"])
    if not files["cr"].exists():
        write_cr(files["cr"])
    counts = {"ct": args.ct, "cr": args.cr}
    voi = {"ct": ["+Wi", "1"], "cr": ["+Wm"]}
    labels = {"ct": "CT 512x512 16-bit (window 40/400)",
              "cr": "CR 3000x3000 16-bit MONOCHROME1 (auto window)"}

    results: dict[str, dict] = {key: {} for key in files}
    for key, path in files.items():
        print(f"dicomgate: {labels[key]}, {counts[key]} renders ...", flush=True)
        results[key]["dicomgate"] = bench_dicomgate(path, counts[key])
    print(f"dicomgate: CR with max_size 1024, {args.cr} renders ...", flush=True)
    results["cr"]["dicomgate-1024"] = bench_dicomgate(files["cr"], args.cr, max_size=1024)
    if "dcmtk" in peers:
        for key, path in files.items():
            print(f"DCMTK dcmj2pnm: {labels[key]}, {counts[key]} processes ...", flush=True)
            results[key]["dcmtk"] = bench_dcmtk(path, counts[key], voi[key],
                                                args.workdir / f"dcmtk-{key}.jpg")
    if "orthanc" in peers:
        print("Orthanc: starting, uploading ...", flush=True)
        with OrthancPreview(args.workdir / "orthanc") as orthanc:
            ids = {key: orthanc.upload(path) for key, path in files.items()}
            for key in files:
                print(f"Orthanc /preview: {labels[key]}, {counts[key]} requests ...", flush=True)
                results[key]["orthanc"] = orthanc.bench(ids[key], counts[key])

    print()
    print(f"Renders per second (JPEG quality 90; host {platform.node()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")
    header = ("| image | dicomgate r/s | DCMTK dcmj2pnm r/s (incl. process start) | "
              "Orthanc /preview r/s | dicomgate / DCMTK | dicomgate / Orthanc | "
              "dicomgate median ms | dicomgate peak RSS growth MB |")
    print(header)
    print("| --- " + "| ---: " * 7 + "|")
    for key in files:
        row = results[key]
        ours, dcmtk, orthanc = rate(row.get("dicomgate")), rate(row.get("dcmtk")), \
            rate(row.get("orthanc"))
        growth = row["dicomgate"]["peak_growth_mb"]
        print(f"| {labels[key]} | {fmt(ours)} | {fmt(dcmtk)} | {fmt(orthanc)} | "
              f"{fmt(ours / dcmtk if ours and dcmtk else None, 2)} | "
              f"{fmt(ours / orthanc if ours and orthanc else None, 2)} | "
              f"{fmt(row['dicomgate']['median_ms'])} | {fmt(growth)} |")
    small = results["cr"]["dicomgate-1024"]
    print(f"\ndicomgate, CR with max_size = 1024: {fmt(rate(small))} r/s, median "
          f"{fmt(small['median_ms'])} ms, peak RSS growth {fmt(small['peak_growth_mb'])} MB")
    print("JPEG sizes (bytes): " + "; ".join(
        f"{key} {name} {result['jpeg_bytes']:,}" for key in files
        for name, result in results[key].items()))
    print("Ratios are renders/s of dicomgate divided by the other's: above 1, dicomgate is "
          "faster.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "labels": labels,
                                         "when": time.strftime("%Y-%m-%d %H:%M:%S")},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
