"""Compile the scan, sampled, layer-op, top-k select and hashtopk score kernels for sm_90 on a machine without a
GPU (catches Triton compile errors before a device call). Prints registers / spills where ptxas
runs.
Usage: python scripts/compile_check.py [num_warps] [BN] [CB] [PDL] [TR] [maxnreg]"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vattn.kernels import _scan_triton as kt

nw = int(sys.argv[1]) if len(sys.argv) > 1 else 4
BN = int(sys.argv[2]) if len(sys.argv) > 2 else 64
CB = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
P, I, F = "*i32", "i32", "fp32"
common = dict(R=4, M=16, W=1, WP=2, D=128, RWP=4, NH=128, SH=0, HW=True, IEEE=False,
              PDL=int(sys.argv[4]) if len(sys.argv) > 4 else 0, TR=int(sys.argv[5]) if len(sys.argv) > 5 else 0)


def sig(names, types):
    return dict(zip(names, types))


def build(fn, sigd, const):
    # pointers and strides divisible by 16, as the launcher specialises them at real shapes
    div = {"sqb", "sqh", "skb", "skh", "skn", "svb", "svh", "svn", "N"}
    names = list(sigd)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sigd[n].startswith("*") or n in div}
    src = ASTSource(fn=fn, signature=sigd | {k: "constexpr" for k in const}, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, **({"maxnreg": int(sys.argv[6])} if len(sys.argv) > 6 else {})))
    import os, re, subprocess, tempfile
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(re.sub(r"\.version 9\.\d+", ".version 8.8", k.asm["ptx"]))  # the bundled ptxas reads up to 8.8
    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    m = re.search(r"Used (\d+) registers", r.stderr)
    sp = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (m.group(1) if m else "?"), (sp.group(1) if sp else "?"), k.metadata.shared


def report(name, fn, s, c):
    """Compile one kernel variant and print its registers, spills and shared memory (or why not)."""
    try:
        regs, spill, smem = build(fn, s, c)
        print(f"{name} compiled: {regs} registers, {spill} bytes spilled, {smem} bytes shared")
    except Exception as e:
        print(name, "FAILED:", str(e)[:1500], "\nCAUSE:", repr(e.__cause__)[:1500] if e.__cause__ else "")


cut_names = ("q proj ks k lens hist ctr cut pil pbin qs tot tr sqb sqh skb skh skn H N sink window K KF STRIDE seed "
             "m0 scale_log2").split()
cut_types = ["*bf16", "*fp32", P, "*bf16", P, P, P, P, "*fp32", P, P, P, "*i64"] + [I] * 10 + [F] + [I] * 3 + [F]
scan_names = ("q proj qs ks k v lens cut scr cnt po plse tr sqb sqh skb skh skn svb svh svn H N S1 S sink window "
              "seed scale_log2").split()
scan_types = ["*bf16", "*fp32", P, P, "*bf16", "*bf16", P, P, P, P, "*fp32", "*fp32", "*i64"] + [I] * 15 + [F]
smp_names = ("q qs ks k v lens cut pil pbin cnt po plse stats tot tr sqb sqh skb skh skn svb svh svn H N S1 S2 "
             "sink window K KF m0 seed scale_log2 zz eps2 infl").split()
smp_types = ["*bf16", P, P, "*bf16", "*bf16", P, P, "*fp32", P, P, "*fp32", "*fp32", "*fp32", P, "*i64"] + \
            [I] * 15 + [F] + [I] * 2 + [F] * 4
for name, fn, s, c in (("cut_kernel", kt.cut_kernel, sig(cut_names, cut_types),
                        common | dict(PP=16, M0P=128, PC=16, BN=1024, CL=32, UPD=1, CNT=1)),
                       ("scan_kernel", kt.scan_kernel, sig(scan_names, scan_types), common | dict(CB=CB, BN=BN)),
                       ("sample_kernel", kt.sample_kernel, sig(smp_names, smp_types),
                        common | dict(BN=BN, M0P=128, SP=64, PRE=int(nw == 8), OUT=0, CNT=1)),
                       ("sample_kernel (output mode)", kt.sample_kernel, sig(smp_names, smp_types),
                        common | dict(BN=BN, M0P=128, SP=64, PRE=int(nw == 8), OUT=1, CNT=1))):
    report(name, fn, s, c)

# the sampled chain (vattn/kernels/_sampled_triton.py)
from vattn.kernels import _sampled_triton as st
mem_names = "idx cnt starts lens bits kmid tot K NW H sink window".split()
sam_names = ("q k v starts lens bits kmid po plse stats tot sqb sqh skb skh skn svb svh svn H NW S1 S2 sink window "
             "m0 seed scale_log2 zz eps2 infl").split()
sam_types = ["*bf16"] * 3 + [P] * 4 + ["*fp32"] * 3 + [P] + [I] * 16 + [F] * 4
for name, fn, s, c in (("member_kernel", st.member_kernel, sig(mem_names, [P] * 7 + [I] * 5), dict(BW=1024, BK=1024, CNT=1)),
                       *((f"sampled sample_kernel (OUT={o})", st.sample_kernel, sig(sam_names, sam_types),
                          dict(R=4, M=16, RS=4, D=128, BN=BN, M0P=128, SP=16, IEEE=False, PDL=common["PDL"], OUT=o,
                               CNT=1)) for o in (0, 1))):
    report(name, fn, s, c)

# the engine's layer ops (vattn/kernels/layer_ops.py) at Llama-3-8B shapes, bf16
from vattn.kernels import layer_ops as lo
add_rms, qkv_rope, glu = lo._kernels()
B = "*bf16"
rope_names = "qkv pos cos sin qn kn q_out k_out v_out rows".split()
rope_sig = dict(zip(rope_names, [B, "*i64", "*fp32", "*fp32", B, B, B, B, B, "*i64"])) | \
    {n: I for n in "sxb sxt spb spt sqb sqh sqt skb skh skt svb svh svt T HQ HKV D".split()} | {"eps": F}
for name, fn, s, c in (
        ("add_rms_kernel", add_rms, sig("x delta w wd h_out x_out H eps".split(), [B] * 6 + [I, F]),
         dict(BH=4096, HAS_DELTA=True, NORM_DELTA=False, GEMMA=False)),
        ("add_rms_kernel (gemma sandwich)", add_rms,
         sig("x delta w wd h_out x_out H eps".split(), [B, B, "*fp32", "*fp32", B, B, I, F]),
         dict(BH=4096, HAS_DELTA=True, NORM_DELTA=True, GEMMA=True)),
        ("qkv_rope_kernel (q/k norm, cache)", qkv_rope, rope_sig, dict(HP=32, BD=128, NORM=True, GEMMA=False, CACHE=True, Q_ROWS=True)),
        ("glu_kernel (silu)", glu, sig("gu out I".split(), [B, B, I]), dict(BI=1024, ACT=0)),
        ("glu_kernel (gelu-tanh)", glu, sig("gu out I".split(), [B, B, I]), dict(BI=1024, ACT=1))):
    report(name, fn, s, c)

# the top-k select (vattn/kernels/select.py): candidate lists, radix passes over them or the
# bisection program (a list; Quest's pages, per query head and grouped), emit
from vattn.kernels import select as ks
_, _, radix, emit, floor, count, compact, bisect = ks._kernels()
S32, L = "*fp32", "*i64"
rad_names = "s N kr HT T KMAX hist above state offs ctr CH P lo_p hi_p PAGE cv clen C CHC".split()
rad_types = [S32, I, L, I, I, I, P, P, P, P, P, I, I, L, L, I, S32, P, I, I]
emit_names = "s N state offs CH P out cnt W PW HT T fidx fcnt W1 lo_p hi_p end_p start_p cv cp clen C CHC".split()
emit_types = [S32, I, P, P, I, I, P, P, I, I, I, I, L, L, I, L, L, L, L, S32, P, P, I, I]
cmp_names = "s N kr KMAX HT T fl_p cnt CH P cv cp clen C".split()
bis_names = "s N kr HT T KMAX state offs CH P lo_p hi_p PAGE cv clen C CHC grp HQ".split()
bis_types = [S32, I, L, I, I, I, P, P, I, I, L, L, I, S32, P, I, I, S32, I]
for name, fn, s, c in (
        ("select floor", floor, sig("s N kr KMAX HT T fl_p Z".split(), [S32, I, L, I, I, I, P, F]), dict(S=ks.SAMPLE)),
        ("select count", count, sig("s N fl_p cnt CH P".split(), [S32, I, P, P, I, I]), dict(BLK=ks.BLOCK)),
        ("select compact", compact, sig(cmp_names, [S32, I, L, I, I, I, P, P, I, I, S32, P, P, I]),
         dict(PP=64, BLK=ks.BLOCK)),
        *((f"select radix (FIRST={f}, LAST={la})", radix, sig(rad_names, rad_types),
           dict(SHIFT=sh, BITS=8, FIRST=f, LAST=la, NBIN=ks.NB, BLK=ks.BLOCK, PB=ks.RESOLVE_TILE, CAND=True, LEV=0))
          for sh, f, la in ((24, True, False), (16, False, False), (0, False, True))),
        ("select counting pass (33 levels: hashtopk, 32 bits)", radix, sig(rad_names, rad_types),
         dict(SHIFT=0, BITS=6, FIRST=True, LAST=True, NBIN=64, BLK=ks.BLOCK, PB=ks.RESOLVE_TILE, CAND=False, LEV=33)),
        ("select emit", emit, sig(emit_names, emit_types),
         dict(FRONT=True, LASTPAGE=False, PAGE=1, SP=1, BLK=ks.BLOCK, FB=256, CAND=True)),
        ("select bisect (a list of 8192)", bisect, sig(bis_names, bis_types),
         dict(RB=8192, PR=32, PB=ks.RESOLVE_TILE, CAND=True, G=1, GP=1)),
        ("select bisect (4 heads' pages, 2048)", bisect, sig(bis_names, bis_types),
         dict(RB=2048, PR=32, PB=ks.RESOLVE_TILE, CAND=False, G=4, GP=4))):
    report(name, fn, s, c)

# hashtopk's scores (vattn/kernels/bits.py): per query head, and summed per KV head signing the newest key
from vattn.kernels import bits as kb
hs_names = "q ks proj out lo_p hi_p sqb sqh sqt HQ HKV T N CAP PAD k skb skh skn len_p".split()
hs_types = ["*bf16", P, "*fp32", S32, L, L, I, I, I, I, I, I, I, I, I, "*bf16", I, I, I, P]
for name, c in (("hash scores (per head, 32 bits)", dict(G=4, W=1, WP=1, D=128, BN=512, SHARED=False, UPD=False, HW=True)),
                ("hash scores (share='kv', 64 bits, signing)", dict(G=4, W=2, WP=2, D=128, BN=512, SHARED=True, UPD=True,
                                                                   HW=True))):
    report(name, kb._kernel(), sig(hs_names, hs_types), c)
