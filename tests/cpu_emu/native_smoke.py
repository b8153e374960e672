"""Run the native module on an emulated CPU (qemu-user) with fewer instruction sets than this one.

Usage: python native_smoke.py PATH_TO__C.so EXPECTED_CAPABILITY RTOL ATOL

Loads ``retain._C`` by path, without torch or numpy (both are slow to start under emulation),
checks the capability it picked, that asking for a higher one is refused with a clear error, and
runs each CPU kernel family's forward on float32 data in ctypes arrays against plain-Python
references. Sizes exceed every vector width with a remainder (37 features, 70 logits, K = V = 40),
so full vectors and tails both run. Any instruction the emulated CPU lacks (an AVX-512 copy of a
shared function, a static initialiser compiled for AVX-512) ends the process with SIGILL.
Prints 'native smoke: N checks, 0 failed' when every check held.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import math
import random
import sys

F32, THREADS = 0, 2


def load(path: str):
    loader = importlib.machinery.ExtensionFileLoader("retain._C", path)
    spec = importlib.util.spec_from_file_location("retain._C", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def floats(values):
    return (ctypes.c_float * len(values))(*values)


def zeros(ctype, n):
    return (ctype * max(n, 1))()


def ptr(buf) -> int:
    return ctypes.addressof(buf)


class Checker:
    def __init__(self, rtol: float, atol: float):
        self.rtol, self.atol, self.checks, self.failed = rtol, atol, 0, []

    def close(self, what: str, got, want) -> None:
        self.checks += 1
        bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if not abs(g - w) <= self.atol + self.rtol * abs(w)]
        if bad:
            self.failed.append(f"{what}: {len(bad)} of {len(want)} differ, first (index, got, want) {bad[0]}")

    def true(self, what: str, ok: bool) -> None:
        self.checks += 1
        if not ok:
            self.failed.append(what)


def check_linear_recurrence(C, chk: Checker, rng: random.Random) -> None:
    B, T, D = 2, 5, 37
    a = [rng.uniform(0.5, 1.0) for _ in range(B * T * D)]
    x = [rng.gauss(0, 1) for _ in range(B * T * D)]
    h = zeros(ctypes.c_float, B * T * D)
    fa, fx = floats(a), floats(x)
    C.linear_recurrence_fwd_cpu(F32, ptr(fa), ptr(fx), 0, ptr(h), B, T, D, False, THREADS)
    want = []
    for b in range(B):
        state = [0.0] * D
        rows = []
        for t in range(T):
            o = (b * T + t) * D
            state = [fa[o + d] * state[d] + fx[o + d] for d in range(D)]
            rows += state
        want += rows
    chk.close("linear_recurrence forward", list(h), want)


def check_margin(C, chk: Checker, rng: random.Random) -> None:
    N, D = 6, 37
    hv = floats([rng.gauss(0, 1) for _ in range(N * D)])
    hr = floats([rng.gauss(0, 1) for _ in range(N * D)])
    loss = zeros(ctypes.c_double, N)
    C.feature_imitation_fwd_cpu(F32, ptr(hv), ptr(hr), 0, N, D, 2, ptr(loss), THREADS)
    want = [sum((hv[r * D + d] - hr[r * D + d]) ** 2 for d in range(D)) for r in range(N)]
    chk.close("feature_imitation forward (p=2)", list(loss), want)

    V, temp = 70, 2.0
    z = floats([rng.gauss(0, 2) for _ in range(N * V)])
    q = floats([rng.gauss(0, 2) for _ in range(N * V)])
    kl, lse, lse_ref = zeros(ctypes.c_double, N), zeros(ctypes.c_double, N), zeros(ctypes.c_double, N)
    C.kl_imitation_fwd_cpu(F32, ptr(z), ptr(q), 0, N, V, 1.0 / temp, ptr(kl), ptr(lse), ptr(lse_ref), THREADS)
    want = []
    for r in range(N):
        zs, qs = [z[r * V + v] / temp for v in range(V)], [q[r * V + v] / temp for v in range(V)]
        lz = max(zs) + math.log(sum(math.exp(a - max(zs)) for a in zs))
        lq = max(qs) + math.log(sum(math.exp(b - max(qs)) for b in qs))
        want.append(sum(math.exp(b - lq) * ((b - lq) - (a - lz)) for a, b in zip(zs, qs)))
    chk.close("kl_imitation forward", list(kl), want)

    B, L = 2, 3
    labels = (ctypes.c_int8 * (B * L * D))(*[rng.choice((-1, 0, 1)) for _ in range(B * L * D)])
    pos = floats([rng.uniform(0.2, 0.8) for _ in range(D)])
    neg = floats([rng.uniform(-0.8, -0.2) for _ in range(D)])
    sums, counts = zeros(ctypes.c_double, B * L), zeros(ctypes.c_int64, B * L)
    bits = zeros(ctypes.c_uint16, B * L * 2 * ((D + 15) // 16))
    C.tm_loss_fwd_cpu(F32, False, ptr(hv), ptr(labels), D, ptr(pos), ptr(neg), False, 0, B, L, D, ptr(sums),
                      ptr(counts), ptr(bits), THREADS)
    want_sum, want_count = [], []
    for r in range(B * L):
        terms = []
        for d in range(D):
            x, lab, p, n = hv[r * D + d], labels[r * D + d], pos[d], neg[d]
            lo, hi = (p, math.inf) if lab > 0 else ((-math.inf, n) if lab < 0 else (n, p))
            terms.append(max(0.0, lo - x) + max(0.0, x - hi))
        want_sum.append(sum(terms))
        want_count.append(sum(1 for e in terms if e > 0))
    chk.close("tm_loss forward (row sums)", list(sums), want_sum)
    chk.true(f"tm_loss forward (violations per row): {list(counts)} != {want_count}", list(counts) == want_count)


def check_memory_scan(C, chk: Checker, rng: random.Random) -> None:
    # the gated delta rule: e = S^T k - v, S <- a S - beta k e^T, o = S^T q (one head, two sequences)
    B, T, H, K, V = 2, 4, 1, 40, 40
    q = floats([rng.gauss(0, 0.3) for _ in range(B * T * K)])
    k = floats([rng.gauss(0, 0.3) for _ in range(B * T * K)])
    v = floats([rng.gauss(0, 1) for _ in range(B * T * V)])
    beta = floats([rng.uniform(0.1, 0.9) for _ in range(B * T)])
    g = floats([math.log(rng.uniform(0.8, 1.0)) for _ in range(B * T)])
    o = zeros(ctypes.c_float, B * T * V)
    params = dict(B=B, T=T, H=H, K=K, V=V, N=B, states_every=0, states_rows=0, ckpt_every=0, q=ptr(q), k=ptr(k),
                  v=ptr(v), beta=ptr(beta), g=ptr(g), o=ptr(o), scale=1.0, p=3.0, delta=1.0, eps=1e-6,
                  objective=1, gate_kind=1, l2norm=False, retention_first=False, gate_log=True, momentum=False)
    C.memory_scan_fwd_cpu(F32, params, THREADS)
    want = []
    for b in range(B):
        S = [[0.0] * V for _ in range(K)]
        for t in range(T):
            r = b * T + t
            kk, qq, vv = k[r * K:(r + 1) * K], q[r * K:(r + 1) * K], v[r * V:(r + 1) * V]
            e = [sum(S[i][j] * kk[i] for i in range(K)) - vv[j] for j in range(V)]
            a = math.exp(g[r])
            S = [[a * S[i][j] - beta[r] * kk[i] * e[j] for j in range(V)] for i in range(K)]
            want += [sum(S[i][j] * qq[i] for i in range(K)) for j in range(V)]
    chk.close("memory_scan forward (gated delta rule)", list(o), want)


def main(argv: list[str]) -> int:
    path, expected, rtol, atol = argv[0], argv[1], float(argv[2]), float(argv[3])
    C = load(path)
    chk = Checker(rtol, atol)
    got = C.cpu_capability()
    chk.true(f"capability: expected {expected}, got {got}", got == expected and C.cpu_capability_supported() == expected)
    if expected != "avx512":
        try:
            C.set_cpu_capability("avx512")
            chk.true("set_cpu_capability('avx512') was accepted on a CPU without AVX-512", False)
        except ValueError as exc:
            chk.true(f"unclear refusal of avx512: {exc}", "lacks" in str(exc) and expected in str(exc))
    rng = random.Random(0)
    for check in (check_linear_recurrence, check_margin, check_memory_scan):
        check(C, chk, rng)
    for f in chk.failed:
        print("FAILED:", f)
    print(f"native smoke: {chk.checks} checks, {len(chk.failed)} failed")
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
