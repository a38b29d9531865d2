import numpy as np
import pytest
from PIL import Image

from bbam.report import overlay_map, overlay_prediction, overlay_pseudo, write_report


def _image():
    return np.full((16, 20, 3), 100, np.uint8)


def test_overlays_change_only_marked_pixels():
    img = _image()
    fg = np.zeros((16, 20), bool)
    fg[2:6, 3:9] = True
    out = overlay_pseudo(img, fg, None)
    assert (out[fg] != img[fg]).any(axis=1).all() and (out[~fg] == img[~fg]).all()
    assert out[3, 4, 1] > img[3, 4, 1]  # green
    label = np.zeros((16, 20), np.uint8)
    label[10:, :5] = 15
    pred = overlay_prediction(img, label)
    assert (pred[label == 0] == img[label == 0]).all() and (
        pred[label == 15] != img[label == 15]
    ).any()
    masks = np.stack([fg, ~fg])
    assert (overlay_prediction(img, masks) != img).any(axis=2).all()
    heat = overlay_map(img, np.linspace(0, 1, 320).reshape(16, 20))
    assert heat[15, 19, 0] > heat[0, 0, 0]  # high values are red


def test_write_report(tmp_path):
    metrics = {
        "bbam": {"sem_miou": 0.6, "ins_ap50": 0.45},
        "full": {"sem_miou": 0.8, "ins_ap50": 0.5},
        "box": {"sem_miou": 0.5, "ins_ap50": 0.3},
        "note": "synthetic <data>",
    }
    fg = np.zeros((16, 20), bool)
    fg[4:10, 4:10] = True
    samples = [
        {
            "image": _image(),
            "bbam_map": np.random.default_rng(0).random((16, 20)),
            "pseudo_fg": fg,
            "pseudo_ignore": np.roll(fg, 3, 1) & ~fg,
            "prediction": fg.astype(np.uint8),
            "name": "a&b",
        },
        {"image": _image()},
    ]
    path = write_report(tmp_path / "rep", metrics, samples)
    text = path.read_text()
    assert path.name == "index.html"
    assert "0.7500" in text  # bbam/full sem_miou ratio
    assert "0.9000" in text  # bbam/full ins_ap50 ratio
    assert "96.7%" in text and "92.2%" in text
    assert "synthetic &lt;data&gt;" in text and "a&amp;b" in text
    pngs = sorted(p.name for p in (tmp_path / "rep").glob("*.png"))
    assert len(pngs) == 5
    for name in pngs:
        assert f'src="{name}"' in text
        # 16x20 is upsampled (nearest, x8 at most) so that a person can see it
        assert Image.open(tmp_path / "rep" / name).size == (160, 128)
    with pytest.raises(ValueError, match="sample 0"):
        write_report(tmp_path / "bad", {}, [{"image": np.zeros((4, 4))}])
