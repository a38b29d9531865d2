"""Test helpers (not a test module): a local HTTP archive server and fixture archives.

The server supports `Range: bytes=N-`, can cut the connection after N bytes, can ignore
Range (answering 200 with the whole file), and logs every request.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import scipy.io
from PIL import Image

from bbam.data.palette import voc_colormap

# --------------------------------------------------------------------- server


class ArchiveServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.log: list[dict] = []
        self.cuts: dict[str, list[int]] = {}  # path -> bytes to send on successive requests
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                entry = {"path": name, "range": rng, "status": None, "sent": 0}
                server.log.append(entry)
                data = server.files.get(name)
                if data is None:
                    entry["status"] = 404
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    entry["status"] = 206
                else:
                    self.send_response(200)
                    entry["status"] = 200
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = server.cuts.get(name)
                if cuts:
                    body = body[: cuts.pop(0)]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                entry["sent"] = len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def local_only_urlopen(monkeypatch) -> None:
    """Fail any request that is not to 127.0.0.1 (the registry URLs must never be contacted)."""
    real = urllib.request.urlopen

    def guarded(req, *args, **kwargs):
        url = req.full_url if isinstance(req, urllib.request.Request) else str(req)
        assert url.startswith("http://127.0.0.1:"), f"test tried to contact {url}"
        return real(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- archives


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png_index(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette(voc_colormap(256).reshape(-1).tolist())  # as in the real VOC PNGs
    image.save(buf, format="PNG")
    return buf.getvalue()


def mat_bytes(mdict: dict) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, mdict)
    return buf.getvalue()


VOC_CLASS_INDEX = {"car": 7, "cat": 8, "dog": 12, "person": 15}
W, H = 64, 48
# image id -> objects (class, 0-based x2/y2-exclusive box); the masks fill the boxes.
VOC_IMAGES = {
    "2008_000001": [("cat", (2, 3, 30, 40)), ("dog", (34, 5, 60, 44))],
    "2008_000002": [("person", (10, 10, 40, 45))],
    "2008_000003": [("cat", (5, 5, 50, 40))],
    "2008_000004": [("car", (1, 1, 20, 20)), ("car", (30, 20, 63, 47))],
}
VOC_SEG = {"train": ["2008_000001"], "val": ["2008_000002"]}
SBD_SPLITS = {"train": ["2008_000003"], "val": ["2008_000004", "2008_000002"]}
TRAIN_AUG = ["2008_000001", "2008_000003", "2008_000004"]  # (seg train | sbd) - seg val


def box_masks(image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(instance index map, class map) for one fixture image."""
    inst = np.zeros((H, W), np.uint8)
    cls = np.zeros((H, W), np.uint8)
    for k, (name, (x1, y1, x2, y2)) in enumerate(VOC_IMAGES[image_id], start=1):
        inst[y1:y2, x1:x2] = k
        cls[y1:y2, x1:x2] = VOC_CLASS_INDEX[name]
    return inst, cls


def void_band(image_id: str) -> np.ndarray:
    """HxW bool: the 1-pixel 255 ring the VOC PNGs (not SBD's .mat) draw around each object,
    outside every box, so that the instance masks stay the boxes of `box_masks`."""
    inside = np.zeros((H, W), bool)
    grown = np.zeros((H, W), bool)
    for _, (x1, y1, x2, y2) in VOC_IMAGES[image_id]:
        inside[y1:y2, x1:x2] = True
        grown[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = True
    return grown & ~inside


def voc_xml(image_id: str) -> bytes:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin>"
        f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, (x1, y1, x2, y2) in VOC_IMAGES[image_id]
    )
    return (
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{W}</width>"
        f"<height>{H}</height><depth>3</depth></size>{objs}</annotation>"
    ).encode()


def voc_tar() -> bytes:
    base = "VOCdevkit/VOC2012/"
    m: dict[str, bytes] = {}
    for i, image_id in enumerate(VOC_IMAGES):
        m[f"{base}JPEGImages/{image_id}.jpg"] = jpeg(W, H, i)
        m[f"{base}Annotations/{image_id}.xml"] = voc_xml(image_id)
    for split, ids in VOC_SEG.items():
        m[f"{base}ImageSets/Segmentation/{split}.txt"] = "".join(i + "\n" for i in ids).encode()
        for image_id in ids:
            inst, cls = box_masks(image_id)
            inst[void_band(image_id)] = cls[void_band(image_id)] = 255  # as VOC's PNGs
            m[f"{base}SegmentationObject/{image_id}.png"] = png_index(inst)
            m[f"{base}SegmentationClass/{image_id}.png"] = png_index(cls)
    return tar_bytes(m, mode="w")  # the real VOC archive is an uncompressed tar


def sbd_tgz() -> bytes:
    base = "benchmark_RELEASE/dataset/"
    m: dict[str, bytes] = {}
    for split, ids in SBD_SPLITS.items():
        m[f"{base}{split}.txt"] = "".join(i + "\n" for i in ids).encode()
        for image_id in ids:
            inst, cls = box_masks(image_id)
            cats = np.array([VOC_CLASS_INDEX[n] for n, _ in VOC_IMAGES[image_id]], np.uint8)
            m[f"{base}inst/{image_id}.mat"] = mat_bytes(
                {"GTinst": {"Segmentation": inst, "Categories": cats, "Boundaries": []}}
            )
            m[f"{base}cls/{image_id}.mat"] = mat_bytes(
                {"GTcls": {"Segmentation": cls, "CategoriesPresent": np.unique(cats)}}
            )
            m[f"{base}img/{image_id}.jpg"] = jpeg(W, H, 7)
    return tar_bytes(m, mode="w:gz")


def mcg_mat(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    sp = rng.integers(1, 5, (H, W)).astype(np.uint16)
    labels = np.empty((3, 1), dtype=object)
    for i in range(3):
        labels[i, 0] = np.array([[i + 1]], np.uint16)
    return mat_bytes({"superpixels": sp, "labels": labels, "scores": np.linspace(1, 0, 3)})


def mcg_tgz(folder: str, stems: list[str]) -> bytes:
    return tar_bytes({f"{folder}/{s}.mat": mcg_mat(i) for i, s in enumerate(stems)}, "w:gz")


COCO_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
# split -> image id -> list of (category_id, xywh)
COCO_IMAGES = {
    "train2017": {9: [(1, (2, 2, 20, 30)), (3, (30, 10, 20, 20))]},
    "val2017": {139: [(3, (5, 5, 30, 30))], 285: [(1, (1, 1, 40, 40)), (1, (40, 4, 20, 30))]},
}


def coco_json(split: str) -> bytes:
    images, anns, next_id = [], [], 1
    for image_id, objs in COCO_IMAGES[split].items():
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": W, "height": H}
        )
        for cat, (x, y, w, h) in objs:
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append(
                {
                    "id": next_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [poly],
                }
            )
            next_id += 1
    return json.dumps(
        {"images": images, "annotations": anns, "categories": COCO_CATEGORIES}
    ).encode()


def coco_zips() -> dict[str, bytes]:
    """filename -> zip bytes for the three COCO 2017 archives."""
    out = {}
    for split, imgs in COCO_IMAGES.items():
        out[f"{split}.zip"] = zip_bytes(
            {f"{split}/{i:012d}.jpg": jpeg(W, H, i) for i in imgs} | {f"{split}/": b""}
        )
    out["annotations_trainval2017.zip"] = zip_bytes(
        {f"annotations/instances_{s}.json": coco_json(s) for s in COCO_IMAGES}
    )
    return out
