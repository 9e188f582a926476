"""Build the embedded demo whole-slide image and its annotation in this folder (deterministic).

    python data/wsi/make_demo_slide.py            # or: medssm wsi demo-data --out data/wsi

Writes
- ihc_demo.tiff    : a 4-level pyramidal TIFF (successive IFDs, 256×256 JPEG tiles, 0.25 µm/px nominal, 3072×2560 px)
                     built from scikit-image's real immunohistochemistry image (`skimage.data.immunohistochemistry()`,
                     colonic glands, FHL2 revealed with DAB, hematoxylin counterstain; acquired at the Center for
                     Microscopy And Molecular Imaging (CMMI); distributed with scikit-image under its BSD-3 licence).
                     The source image's physical scale is unknown: the resolution is nominal (see medssm.mil.wsi).
- ihc_demo.geojson : outline of the DAB-positive epithelium (QuPath GeoJSON), class 'DAB-positive'
- ihc_demo.xml     : the same polygons as ASAP XML (group '_0', holes as '_2'), CAMELYON16-style
The code lives in medssm.mil.wsi (`make_demo_slide`) and medssm.mil.heatmaps (`demo_annotation`, `make_demo_data`), so
tests and `medssm demo` can rebuild the same files anywhere without this folder.
"""
import json
from pathlib import Path

from medssm.mil.heatmaps import make_demo_data

if __name__ == '__main__':
    paths = make_demo_data(Path(__file__).resolve().parent)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
