"""Compile the scan kernels for sm_90 on a machine without a GPU (catches Triton compile
errors before a device call). Prints registers / spills where ptxas runs.
Usage: python scripts/compile_check.py [num_warps] [BN]"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vattn.kernels import _scan_triton as kt

nw = int(sys.argv[1]) if len(sys.argv) > 1 else 4
BN = int(sys.argv[2]) if len(sys.argv) > 2 else 64
P, I, F = "*i32", "i32", "fp32"
common = dict(G=4, R=4, M=16, W=1, D=128, RWP=4, NH=128, SH=0, HW=True, IEEE=False)


def sig(names, types):
    return dict(zip(names, types))


def build(fn, sigd, const):
    src = ASTSource(fn=fn, signature=sigd | {k: "constexpr" for k in const}, constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
    meta = k.metadata
    return getattr(meta, "shared", "?"), k.asm.get("ptx", "")[:0]


cut_names = ("q proj ks k lens hist ctr cut pil sqb sqh sqt skb skh skn H N sink window K STRIDE seed m0 "
             "scale_log2").split()
cut_types = ["*bf16", "*fp32", P, "*bf16", P, P, P, P, "*fp32"] + [I] * 14 + [F]
scan_names = ("q proj ks k v lens cut scr cnt po plse sqb sqh sqt skb skh skn svb svh svn H N S1 S sink window "
              "seed scale_log2").split()
scan_types = ["*bf16", "*fp32", P, "*bf16", "*bf16", P, P, P, P, "*fp32", "*fp32"] + [I] * 16 + [F]
smp_names = ("q proj ks k v lens cut pil cnt po plse stats sqb sqh sqt skb skh skn svb svh svn H N S1 S2 "
             "sink window K m0 seed scale_log2 zz eps2 infl").split()
smp_types = ["*bf16", "*fp32", P, "*bf16", "*bf16", P, P, "*fp32", P, "*fp32", "*fp32", "*fp32"] + \
            [I] * 18 + [F] * 4
for name, fn, s, c in (("cut_kernel", kt.cut_kernel, sig(cut_names, cut_types),
                        common | dict(PP=16, M0P=128, BN=1024, CL=32)),
                       ("scan_kernel", kt.scan_kernel, sig(scan_names, scan_types), common | dict(CB=1024, BN=BN)),
                       ("sample_kernel", kt.sample_kernel, sig(smp_names, smp_types),
                        common | dict(BN=BN, M0P=128, SP=64))):
    try:
        build(fn, s, c)
        print(name, "compiled")
    except Exception as e:
        print(name, "FAILED:", str(e)[:1500])
