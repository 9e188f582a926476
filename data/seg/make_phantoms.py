"""Write the embedded synthetic ultrasound phantoms of paper 2 as image/mask files.

Nothing is committed here: phantoms are generated deterministically from a seed (`medssm.seg.all.make_phantom`), on the
fly by the notebooks, demo and CLI (`--data phantoms`). This script writes them to disk for tools that want files,
in the BUSI layout (`synthetic/<name>.png` + `<name>_mask.png`), the generic one (`images/` + `masks/`) or the
reference code's pre-split one (`train|val|test/images/` + `train|val|test/mask/`).
All images are SYNTHETIC (generator version 2: sector-shaped field of view, Rayleigh speckle, low-contrast hypo- or
hyperechoic lesions with soft edges, posterior shadowing/enhancement, burnt-in text that says SYNTHETIC, light-blue
calipers).

    python data/seg/make_phantoms.py OUT_DIR [--patients 174] [--seed 0] [--layout busi|folder|split] [--size H W]

then e.g. `medssm seg train --data OUT_DIR --layout busi --patient-regex '^(phantom\\d+)_'`. The same phantoms come
without files from `medssm seg train --data phantoms --patients 174 --phantom-seed 0 [--phantom-size H W]`.
"""
import argparse
from medssm.seg.data import write_phantom_folder

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out'); p.add_argument('--patients', type=int, default=174, help='2 images per patient (174 → 348)')
    p.add_argument('--seed', type=int, default=0); p.add_argument('--layout', default='busi', choices=['busi', 'folder', 'split'])
    p.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'), help="image size (default: the paper's 380×646 / 432×646)")
    a = p.parse_args()
    root = write_phantom_folder(a.out, a.patients, a.seed, a.layout, size=a.size)
    print(f'wrote {2 * a.patients} synthetic phantoms to {root} ({a.layout} layout)')
