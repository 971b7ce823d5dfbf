"""Plain per-pair references of CHAN's codings and poolings (chan.md §3.3), written straight from
the spec's equations with Python loops over regions and words: no code shared with
:mod:`itmkit.models.coding`. Used by tests/test_coding.py (the functions) and tests/test_chan.py
(the model's engine matrix)."""

import math

import torch


# ------------------------------------------------------------- plain per-pair references (§3.3)
def ref_vha(v, w):
    """v [n, d] real regions, w [m, d] real words -> per word max_k <v_k, w_l>."""
    return [max(float(v[k] @ w[l]) for k in range(len(v))) for l in range(len(w))]


def ref_tha(v, w):
    return [max(float(v[k] @ w[l]) for l in range(len(w))) for k in range(len(v))]


def ref_vsa(v, w, alpha):
    out = []
    for k in range(len(v)):
        logits = [float(v[k] @ w[l]) / alpha for l in range(len(w))]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        a = [e / sum(exps) for e in exps]
        t = sum(a[l] * w[l] for l in range(len(w)))
        out.append(float(v[k] @ t) / (float(t.norm()) + 1e-8))
    return out


def ref_t2i(v, w, smooth):
    """SCAN t2i per word: LeakyReLU, l2 over words per region, softmax over regions, cosine."""
    raw = [[float(v[k] @ w[l]) for l in range(len(w))] for k in range(len(v))]
    leaky = [[x if x > 0 else 0.1 * x for x in row] for row in raw]
    normed = [[x / (math.sqrt(sum(y * y for y in row)) + 1e-8) for x in row] for row in leaky]
    out = []
    for l in range(len(w)):
        logits = [smooth * normed[k][l] for k in range(len(v))]
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        a = [e / sum(exps) for e in exps]
        ctx = sum(a[k] * v[k] for k in range(len(v)))
        ctx = ctx / (ctx.norm() + 1e-8)
        out.append(float(w[l] @ ctx) / (float(w[l].norm()) * float(ctx.norm())))
    return out


REF_POOL = {
    "max": max,
    "mean": lambda s: sum(s) / len(s),
    "sum": sum,
    "lse": lambda s, b=0.1: math.log(sum(math.exp(x / b) for x in s)),
    "softmax": lambda s, b=0.1: sum(math.exp(x / b) / sum(math.exp(y / b) for y in s) * x for x in s),
}


def ref_matrix(images, img_len, captions, cap_len, coding, pooling, alpha=0.1, smooth=9.0, belta=0.1):
    """``[n_img, n_cap]`` float64 scores, one pair at a time on its real regions and words only."""
    out = torch.empty(len(images), len(captions), dtype=torch.float64)
    for i in range(len(images)):
        for c in range(len(captions)):
            v, w = images[i, : img_len[i]], captions[c, : cap_len[c]]
            per = {
                "vha": lambda: ref_vha(v, w),
                "tha": lambda: ref_tha(v, w),
                "vsa": lambda: ref_vsa(v, w, alpha),
                "t2i": lambda: ref_t2i(v, w, smooth),
            }[coding]()
            out[i, c] = REF_POOL[pooling](per, belta) if pooling in ("lse", "softmax") else REF_POOL[pooling](per)
    return out
