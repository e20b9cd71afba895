import importlib.util

from PIL import Image

from conftest import REPO


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_visualize_masks_writes_a_grid(tmp_path):
    out = tmp_path / "masks.png"
    script = load_script("visualize_masks")
    assert script.main(["mask=simmim", "mask.unit=16", "data.image_size=64", "--out", str(out), "--images", "2"]) == 0
    with Image.open(out) as grid:
        assert grid.size == (5 * 66, 2 * 66)


def test_visualize_masks_reports_bad_config(tmp_path, capsys):
    script = load_script("visualize_masks")
    assert script.main(["mask.ratio=2", "--out", str(tmp_path / "x.png")]) == 2
    assert "mask.ratio=2" in capsys.readouterr().err
