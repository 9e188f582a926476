"""Paper 3 (issue 15): the few-shot datasets in their standard layouts — Omniglot's character split (meta-validation
classes disjoint from meta-training; Vinyals et al.'s files or MAML's rule) in Lake's, torchvision's and the
prototypical-networks layouts, errors that state the expected depth, and the standard pickles (MiniImageNet caches,
Lee et al.'s pickles, TieredImageNet PNG pickles and npz, CIFAR-FS, CIFAR-100 with Bertinetto's class lists), read
without running code."""
import io, pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medssm.core import InputError
from medssm.meta.data import (load_cifar_fs, load_miniimagenet, load_omniglot, load_tieredimagenet, omniglot_characters,
                              omniglot_split, safe_unpickle, task_source)


def _png(a): b = io.BytesIO(); Image.fromarray(a).save(b, format='PNG'); return b.getvalue()


def _images(d:Path, n=3, seed=0):
    d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(seed)
    for i in range(n): Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(d/f'{i}.png')


def _omniglot(root:Path, parts=(('images_background', 8), ('images_evaluation', 4)), chars=3):
    for part, n_alpha in parts:
        for a in range(n_alpha):
            for c in range(chars): _images(root/part/f"Alphabet{part.split('_')[-1][0]}{a}"/f'character{c:02d}')
    return root


def _dump(obj, path:Path):
    path.parent.mkdir(parents=True, exist_ok=True); path.write_bytes(pickle.dumps(obj, protocol=2))


def test_omniglot_validation_classes_are_disjoint_from_training(tmp_path):
    root = _omniglot(tmp_path/'omni')                                   # 36 characters
    chars = [k for p in omniglot_characters(root).values() for k in p]
    sp = omniglot_split(root, chars)
    assert sum(map(len, sp.values())) == 36 and all(len(v) >= 1 for v in sp.values())
    assert not set(sp['train']) & set(sp['val']) and not set(sp['train']) & set(sp['test']) and not set(sp['val']) & set(sp['test'])
    src = task_source('omniglot', str(root))
    names = {s: {n.rsplit('_rot', 1)[0] for n in v} for s, v in src.split().items()}
    assert not names['train'] & names['val'] and not names['val'] & names['test']
    assert src.pools['train'] is not src.pools['val']
    # Vinyals et al.'s split files decide when present (lines alphabet/character/rotation)
    d = root/'splits'/'vinyals'; d.mkdir(parents=True)
    (d/'train.txt').write_text('Alphabetb0/character00/rot000\nAlphabetb0/character00/rot090\nAlphabetb1/character02/rot000\n')
    (d/'val.txt').write_text('Alphabetb2/character01/rot000\n')
    (d/'test.txt').write_text('Alphabete0/character00/rot000\n')
    assert [n.rsplit('_rot', 1)[0] for n in load_omniglot(root, 'val').names] == ['Alphabetb2/character01'] * 4
    assert load_omniglot(root, 'train').n_classes == 2 * 4


def test_omniglot_layouts_and_depth_errors(tmp_path):
    _omniglot(tmp_path/'tv'/'omniglot-py')                              # torchvision's download
    _omniglot(tmp_path/'pn', parts=(('data', 9),))                   # prototypical networks' data/ folder
    assert load_omniglot(tmp_path/'tv', 'train').n_classes > 0 and load_omniglot(tmp_path/'pn', 'test').n_classes > 0
    _images(tmp_path/'deep'/'images_background'/'Greek'/'alpha'/'strokes')
    with pytest.raises(InputError, match='two folder levels below images_background/') as e:
        load_omniglot(tmp_path/'deep')
    assert 'one level too deep' in str(e.value)
    _images(tmp_path/'flat'/'images_background'/'Greek')
    with pytest.raises(InputError, match='images directly in an alphabet folder'): load_omniglot(tmp_path/'flat')
    with pytest.raises(InputError, match='omniglot-py'): load_omniglot(tmp_path/'empty')


def test_standard_pickles_load(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 84, 84, 3), dtype=np.uint8)
    # MiniImageNet: Ren et al.'s cache and Lee et al.'s category-split pickle
    _dump({'image_data': x, 'class_dict': {'n01': list(range(6)), 'n02': list(range(6, 12))}}, tmp_path/'mini-imagenet-cache-train.pkl')
    mi = load_miniimagenet(tmp_path, 'train')
    assert (mi.names, mi.sizes, tuple(mi.get(1, np.array([0, 1])).shape)) == (['n01', 'n02'], [6, 6], (2, 3, 84, 84))
    torch.testing.assert_close(mi.get(0, np.array([2]))[0], torch.from_numpy(x[2].transpose(2, 0, 1)).float() / 255)
    _dump({'data': x, 'labels': [64] * 6 + [70] * 6, 'catname2label': {'n09': 64, 'n11': 70}}, tmp_path/'miniImageNet_category_split_val.pickle')
    assert load_miniimagenet(tmp_path, 'val').names == ['n09', 'n11']
    # TieredImageNet: PNG bytes + labels, and Lee et al.'s npz
    _dump([_png(a) for a in x[:4]], tmp_path/'test_images_png.pkl')
    _dump({'label_specific': np.array([1, 1, 2, 2]), 'label_general': np.zeros(4)}, tmp_path/'test_labels.pkl')
    ti = load_tieredimagenet(tmp_path, 'test')
    assert ti.sizes == [2, 2] and ti.validate() == 4
    torch.testing.assert_close(ti.get(1, np.array([1]))[0], torch.from_numpy(x[3].transpose(2, 0, 1)).float() / 255)
    np.savez(tmp_path/'val_images.npz', images=x[:6]); _dump({'label_specific': np.arange(6) % 3}, tmp_path/'val_labels.pkl')
    assert load_tieredimagenet(tmp_path, 'val').sizes == [2, 2, 2]
    # CIFAR-FS: Lee et al.'s pickle, and CIFAR-100's python pickles with Bertinetto's class lists
    _dump({'data': x[:, :32, :32], 'labels': list(np.arange(12) % 4)}, tmp_path/'cfs'/'CIFAR_FS_test.pickle')
    assert load_cifar_fs(tmp_path/'cfs', 'test').sizes == [3, 3, 3, 3]
    c = tmp_path/'c100'/'cifar-100-python'
    _dump({'fine_label_names': ['apple', 'bee', 'cup', 'dog', 'eel', 'fox']}, c/'meta')
    _dump({'data': rng.integers(0, 255, (12, 3072), dtype=np.uint8), 'fine_labels': list(np.arange(12) % 6)}, c/'train')
    _dump({'data': rng.integers(0, 255, (6, 3072), dtype=np.uint8), 'fine_labels': list(range(6))}, c/'test')
    lists = tmp_path/'c100'/'splits'/'bertinetto'; lists.mkdir(parents=True)
    for s, names in (('train', 'apple\nbee\n'), ('val', 'cup\ndog\n'), ('test', 'eel\nfox\n')): (lists/f'{s}.txt').write_text(names)
    src = task_source('cifar_fs', str(tmp_path/'c100'))
    assert src.split() == {'train': ['apple', 'bee'], 'val': ['cup', 'dog'], 'test': ['eel', 'fox']}
    assert src.pools['test'].sizes == [3, 3]


def test_pickles_that_name_code_are_refused(tmp_path):
    marker = tmp_path/'pwned'

    class Evil:
        def __reduce__(self): return (exec, (f"open({str(marker)!r}, 'w').write('x')",))
    _dump({'image_data': np.zeros((2, 84, 84, 3), np.uint8), 'class_dict': {'a': Evil()}}, tmp_path/'mini-imagenet-cache-test.pkl')
    with pytest.raises(InputError, match='refused'): load_miniimagenet(tmp_path, 'test')
    with pytest.raises(InputError, match='refused'): safe_unpickle(tmp_path/'mini-imagenet-cache-test.pkl')
    assert not marker.exists()
    with pytest.raises(InputError, match="keys \\['image_data', 'class_dict'\\]"):
        _dump({'images': 1}, tmp_path/'b'/'mini-imagenet-cache-val.pkl'); load_miniimagenet(tmp_path/'b', 'val')
    with pytest.raises(InputError, match='mini-imagenet-cache-test.pkl'): load_miniimagenet(tmp_path/'none', 'test')
