"""Registers, stack and shared memory of the script's Triton kernels compiled for an H100/H200 (sm_90), without a GPU:
Triton compiles on the CPU and its bundled cuobjdump reads the cubin. A thread's registers bound how many warps an SM
holds (65,536 registers per SM), which is what hides a sequential scan's latency; stack bytes are spills (a few
bytes held across a loop cost nothing; dozens inside it do). "loop" counts the instructions of the longest loop,
one chunk of a scan's steps (SCAN_FWD_STEPS forward, the backward's chunk K), and "shfl" the shuffles among them.
The Triton installed here decides: the GPU machine's may compile differently.

    python3 tools/kernel_resources.py [--states 4 8] [--set SCAN_BWD_STEP_STATES=8 ...] [--script OTHER_train_gpt.py]
"""
import argparse
import importlib.util
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FP32_POINTERS = {"A_ptr", "D_ptr", "bias_ptr", "h0_ptr", "ckpt_ptr", "dB_ptr", "dC_ptr", "dA_ptr", "dD_ptr",
                 "dbias_ptr", "w_ptr", "dw_ptr"}


def compile_sm90(fn, constants: dict, warps: int):
    """The kernel compiled as a launch would specialise it: every pointer 16-byte aligned, every integer a multiple
    of 16, except the arguments the kernel marks do_not_specialize; the tensors the script passes in fp32 (the scan's
    A, D, dt bias, states and gradient partials; the conv's weight and bias) as fp32, the rest bf16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    kind = lambda n: ("constexpr" if n in constants else "*fp32" if n in FP32_POINTERS else "*bf16"
                      if n.endswith("_ptr") else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constants and n not in fn.do_not_specialize}
    src = ASTSource(fn, {n: kind(n) for n in names}, constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def resources(kernel) -> dict:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} from the cubin, and 'LOOP' and 'SHFL': the instructions of the longest
    loop in the assembly (a scan's walk over time: one chunk of steps) and the shuffles among them."""
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = lambda flag: subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True, check=True).stdout
        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    where = {a: i for i, (a, _) in enumerate(code)}
    loops = [[op for _, op in code[where[int(t, 16)]:i + 1]] for i, (a, op) in enumerate(code)
             for t in re.findall(r"BRA\s+0x([0-9a-f]+)", op) if int(t, 16) < a and int(t, 16) in where]
    body = max(loops, key=len, default=[])
    return dict(found, LOOP=len(body), SHFL=sum("SHFL" in op for op in body))


def scan_kernels(tg, d_state: int):
    """(name, kernel, constants, warps) of every scan kernel at this state size and the script's settings."""
    kf, k = tg.scan_chunks(d_state)
    fwd, bwd = (dict(N=d_state, NP=1 << (d_state - 1).bit_length(), BD=32 * w, K=k, EVEN=True) for w in tg.SCAN_WARPS)
    return [("scan forward", tg._scan_fwd_kernel, dict(fwd, KF=kf), tg.SCAN_WARPS[0]),
            ("scan backward", tg._scan_bwd_kernel, bwd, tg.SCAN_WARPS[1])]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--states", type=int, nargs="*", default=[4, 8])
    p.add_argument("--set", nargs="*", default=[], help="module constants, e.g. SCAN_BWD_STEP_STATES=8 SCAN_WARPS=4:2")
    p.add_argument("--script", default=os.path.join(ROOT, "train_gpt.py"), help="another version of the script")
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("train_gpt", a.script)
    tg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tg)

    for kv in a.set:
        name, value = kv.split("=")
        setattr(tg, name, tuple(map(int, value.split(":"))) if ":" in value else int(value))
    conv_bt, conv_bd, conv_tp = tg.CONV_TILE
    conv = dict(K=4, BT=conv_bt, BD=conv_bd, TP=conv_tp)
    rows = [(f"conv forward, tile {conv_bt}:{conv_bd}:{conv_tp}", tg._conv_fwd_kernel, conv, 4),
            (f"conv backward, tile {conv_bt}:{conv_bd}:{conv_tp}", tg._conv_bwd_kernel, conv, 4)]
    for n in a.states:
        rows += [(f"{name}, state {n}", fn, c, w) for name, fn, c, w in scan_kernels(tg, n)]
    print(f"{'kernel':44} {'warps':>5} {'regs':>5} {'stack':>6} {'shared':>7} {'warps/SM':>9} {'loop':>5} {'shfl':>5}")
    for name, fn, constants, warps in rows:
        r = resources(compile_sm90(fn, constants, warps))
        regs = -(-max(r["REG"], 1) // 8) * 8  # allocated in steps of 8 a thread
        per_sm = min(64 // warps, 32, 65536 // (regs * 32 * warps)) * warps  # at most 64 warps and 32 programs
        print(f"{name:44} {warps:5} {r['REG']:5} {r['STACK']:6} {r['SHARED']:7} {per_sm:9} {r['LOOP']:5} {r['SHFL']:5}")


if __name__ == "__main__":
    main()
