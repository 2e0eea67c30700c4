"""The screened greedy head: the same argmax as the full head (lowest index on ties) on random
heads and on adversarial ones (near-ties the int8 screen cannot separate, a screen that ranks
the top two rows the wrong way round, exact ties, many rows close to the maximum)."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attrsparse.deploy.engine import Engine, pack
from attrsparse.deploy.engine.cdefs import (
    MODE_GREEDY_FULL,
    MODE_GREEDY_SCREENED,
    EngModel,
    EngStep,
    engine_library,
)
from attrsparse.deploy.engine.fmt import DTYPE_CODE
from attrsparse.deploy.engine.pack import quantize, screen_tensors


class Head:
    """An EngModel with only a head (no layers) and its screen, for ``eng_head``."""

    def __init__(self, w: torch.Tensor, precision: str, threads: int = 2):
        self.lib = engine_library()
        V, d = w.shape
        self.stored, self.scale, self.deq = quantize(w, precision, dim=0)
        self.screen = screen_tensors(self.deq)
        m = EngModel(n_layers=0, hidden=d, n_heads=1, n_kv=1, head_dim=16, inter=16, vocab=V,
                     head_type=DTYPE_CODE[precision], head=self.stored.data_ptr(),
                     head_scale=None if self.scale is None else self.scale.data_ptr(),
                     screen=self.screen[0].data_ptr(), screen_scale=self.screen[1].data_ptr(),
                     screen_bound=self.screen[2].data_ptr())
        self.model = m
        self.state = self.lib.eng_state_new(ctypes.byref(m), 1, threads, 0, 0)
        self.threads = threads

    def __call__(self, h: torch.Tensor, screened: bool, threads: int | None = None):
        """(argmax, rows computed exactly, logits of the full head or None)."""
        logits = None if screened else torch.empty(self.model.vocab)
        a = EngStep(threads=threads or self.threads, mode=MODE_GREEDY_SCREENED if screened else MODE_GREEDY_FULL,
                    logits=None if logits is None else logits.data_ptr())
        h = h.float().contiguous()
        best = self.lib.eng_head(ctypes.byref(self.model), self.state, h.data_ptr(), ctypes.byref(a))
        return best, a.candidates, logits

    def close(self):
        self.lib.eng_state_free(self.state)


def check(head: Head, h: torch.Tensor) -> int:
    """Screened == full == first index of the maximum of the full logits; returns the candidates."""
    full, _, logits = head(h, screened=False)
    assert full == int(torch.nonzero(logits == logits.max())[0])
    for threads in (1, 2):
        best, cand, _ = head(h, screened=True, threads=threads)
        assert best == full
    return cand


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_screened_argmax_random(precision):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3001, 77, generator=gen) * 0.05
    head = Head(w, precision)
    cands = [check(head, torch.randn(77, generator=gen) * s) for s in (0.1, 1.0, 10.0, 300.0) for _ in range(5)]
    head.close()
    assert max(cands) < 3001 // 10  # the screen prunes most rows
    # the logits the screened path compares are the full head's own values
    assert min(cands) >= 1


def test_screen_bound_is_tight_enough_and_valid():
    """|W_v·h - approx_v| <= c_v ||h|| even for h along the quantisation residual (where
    Cauchy-Schwarz is tight), and c_v is not much more than the residual norm."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(200, 64, generator=gen)
    q, s, c = screen_tensors(w)
    approx = q.double() * s.double()[:, None]
    resid = w.double() - approx
    for v in range(200):
        h = resid[v] / resid[v].norm()
        assert abs(float((w.double()[v] - approx[v]) @ h)) <= float(c[v]) * float(h.norm())
    assert (c.double() <= resid.norm(dim=1) * 1.01 + 1e-3 * w.double().norm(dim=1)).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_screened_argmax_adversarial(precision):
    gen = torch.Generator().manual_seed(2)
    V, d = 2048, 64
    w = torch.randn(V, d, generator=gen) * 0.02
    h = torch.randn(d, generator=gen)
    h = h / h.norm() * 20
    # near-ties: rows 1500 and 700 equal to row 300 up to one tiny change along h, so their
    # int8 screens are identical and only the exact logits separate them
    base = torch.randn(d, generator=gen)
    base = base / base.norm() * 1.0
    w[300] = base
    step = h / h.norm() ** 2 * 1e-4  # changes the logit by 1e-4
    w[1500] = base + step
    w[700] = base + step
    head = Head(w, precision)
    check(head, h)
    assert head(h, True)[0] == (700 if precision == "fp32" else head(h, False)[0])
    head.close()
    # exact ties: duplicates of the best row -> the lowest index wins in both paths
    w2 = w.clone()
    w2[1900] = w2[300]
    w2[1200] = w2[300]
    w2[1500] = w2[700] = torch.zeros(d)
    head = Head(w2, precision)
    check(head, h)
    assert head(h, True)[0] == 300
    head.close()
    # the screen ranks the two best rows the wrong way round: both rows have scale 1.27/127 =
    # 0.01; coordinate 0 (h = 40) rounds a up (0.3051 -> 0.31) and b down (0.3049 -> 0.30),
    # while b's exact extra 0.02 on coordinate 2 (h = 1) makes b the true maximum
    w3 = w.clone()
    w3[1500] = w3[700] = torch.zeros(d)
    hq = h.clone()
    hq[0], hq[1], hq[2] = 40.0, 0.0, 1.0
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], a[1] = 0.3051, 1.27
    b[0], b[1], b[2] = 0.3049, 1.27, 0.02
    w3[100], w3[101] = b, a
    q, sc, _ = screen_tensors(w3[100:102])
    approx = (q.double() * sc.double()[:, None]) @ hq.double()
    exact = w3[100:102].double() @ hq.double()
    assert exact[0] > exact[1] and approx[0] < approx[1]
    head = Head(w3, precision)
    check(head, hq)
    assert head(hq, True)[0] == 100
    head.close()
    # many rows within a hair of the maximum: all of them must be candidates
    w4 = base.repeat(V, 1) + torch.randn(V, d, generator=gen) * 1e-7
    head = Head(w4, precision)
    cand = check(head, h)
    head.close()
    assert cand > V // 2


def test_screened_head_on_a_model(make_tiny, tmp_path):
    """The engine's greedy (screened) tokens equal its full-head tokens on a tiny model whose head
    has near-duplicate rows."""
    model = make_tiny("gemma3_text")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[10:20] = emb[5] + torch.randn(10, emb.shape[1]) * 1e-6
    path = pack(model, "fp32", directory=tmp_path)
    with Engine(path, threads=1, max_ctx=64) as eng:
        screened = eng.generate([1, 5, 9], 40)
        full = eng.generate([1, 5, 9], 40, mode="full")
        checked = eng.generate([1, 5, 9], 40, mode="check")
    assert screened.tokens == full.tokens == checked.tokens == checked.checks
    assert screened.head_cost < full.head_cost == 1.0
    assert checked.head_cost == screened.head_cost


def _head_vma_rss_kb(eng: Engine) -> tuple[int, int]:
    """(number of mappings lying wholly inside the engine file's head, their resident kB), from
    /proc/self/smaps: what of the head this process holds."""
    lo = eng._base + eng.header["data_start"] + eng.header["tensors"]["head"]["offset"]
    hi = lo + eng.lazy_bytes
    inside, rss, cur = 0, 0, None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                a, b = (int(x, 16) for x in first.split("-"))
                cur = lo <= a and b <= hi
                inside += cur
            elif line.startswith("Rss:") and cur:
                rss += int(line.split()[1])
    return inside, rss


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("tied", [False, True])
def test_screened_head_is_read_with_pread_and_never_mapped(tied, tmp_path):
    """A mapped file with a screen leaves its head unpopulated and reads the few exact rows (and a
    tied embedding's rows) with pread: after greedy decoding the process holds no page of the head,
    and the tokens equal those of the same file read into memory (load="copy"). A full-head step
    then maps head pages (so the measure can see them)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    for precision in ("fp32", "bf16"):
        path = pack(model, precision, directory=tmp_path)
        with Engine(path, threads=2, max_ctx=64, load="copy") as copy:
            want = copy.generate([1, 5, 9], 24, mode="full").tokens
            assert copy.lazy_bytes == 0
        with Engine(path, threads=2, max_ctx=64) as eng:
            assert eng.lazy_bytes == 4096 * 32 * (4 if precision == "fp32" else 2)
            got = eng.generate([1, 5, 9], 24)
            assert got.tokens == want and got.head_cost < 1.0
            inside, rss = _head_vma_rss_kb(eng)
            assert inside >= 1 and rss == 0
            assert eng.generate([1, 5, 9], 2, mode="full").tokens == want[:2]
            assert _head_vma_rss_kb(eng)[1] > 0
            fd = eng._head_fd
        with pytest.raises(OSError):
            os.fstat(fd)
