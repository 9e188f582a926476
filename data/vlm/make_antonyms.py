"""Build `wordnet30_adj_antonyms.tsv`: for every single-word WordNet 3.0 adjective that has a direct
antonym, the antonym of its most frequent sense that has one (sense order of `index.adj`).

Usage:  python data/vlm/make_antonyms.py /usr/share/wordnet  [out.tsv]
The WordNet 3.0 database comes from Debian's `wordnet-base` package (`apt-get download wordnet-base`
and `dpkg-deb -x` work without root). Licence: data/vlm/LICENSE-WordNet-3.0.txt.

Parsed directly (format: wndb(5WN)) rather than through NLTK because NLTK's reader needs a `lexnames`
file that Debian's package does not ship and refuses corpus paths outside its data path.
"""
import sys
from pathlib import Path


def parse_data(path):
    "offset -> (words, antonym pointers [(src_word_no, target_offset, target_word_no)])"
    synsets = {}
    for line in Path(path).read_text(encoding='latin-1').splitlines():
        if line.startswith('  '): continue  # licence header
        f = line.split(' | ')[0].split()
        off, n = f[0], int(f[3], 16)
        words = [f[4 + 2 * i].split('(')[0].lower() for i in range(n)]  # strip syntactic markers like (p)
        i = 4 + 2 * n
        p_cnt = int(f[i]); i += 1
        ants = []
        for _ in range(p_cnt):
            sym, toff, pos, st = f[i:i + 4]; i += 4
            if sym == '!': ants.append((int(st[:2], 16), toff, int(st[2:], 16)))
        synsets[off] = (words, ants)
    return synsets


def build(wn_dir):
    wn_dir = Path(wn_dir)
    syn = parse_data(wn_dir / 'data.adj')
    table = {}
    for line in (wn_dir / 'index.adj').read_text(encoding='latin-1').splitlines():
        if line.startswith('  '): continue
        f = line.split()
        lemma, synset_cnt = f[0], int(f[2])
        if '_' in lemma: continue  # multi-word lemmas never match a single report token
        for off in f[-synset_cnt:]:  # senses, most frequent first
            words, ants = syn[off]
            hits = [(t, tw) for s, t, tw in ants if words[s - 1] == lemma]
            if hits:
                t, tw = hits[0]
                ant = syn[t][0][tw - 1]
                if '_' not in ant: table[lemma] = ant; break
    return table


if __name__ == '__main__':
    wn_dir = sys.argv[1] if len(sys.argv) > 1 else '/usr/share/wordnet'
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name('wordnet30_adj_antonyms.tsv')
    table = build(wn_dir)
    out.write_text(''.join(f'{k}\t{v}\n' for k, v in sorted(table.items())))
    print(f'{len(table)} adjectives with an antonym -> {out}')
