"""A plain-Python BPE trainer: the specification tok.bpe_merges must match merge for merge.

Same rules: chunks are split with tok's pattern and counted; each step counts every adjacent pair
(weighted by chunk count), takes the highest count, ties to the smallest (left id, right id), skips
for good a pair whose bytes are already a token, and merges left to right inside every chunk."""
from collections import Counter


def train_reference(chunk_counts: dict, n_merges: int):
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunk_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    never, merges = set(), []
    while len(merges) < n_merges:
        pairs = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        best = None
        for pair, c in pairs.items():
            if pair in never or c <= 0:
                continue
            if best is None or (c, -pair[0], -pair[1]) > (pairs[best], -best[0], -best[1]):
                best = pair
        if best is None:
            break
        a, b = best
        if vocab[a] + vocab[b] in vocab:
            never.add(best)
            continue
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append(best)
        for ids, _ in words:
            i, out = 0, []
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids[:] = out
    return merges
