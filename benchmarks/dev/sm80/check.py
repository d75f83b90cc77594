"""GPU-free NVRTC compile check of every shipped sm80 specialization, sm_80 and sm_90a.

Prints registers / spills / stack / static+dynamic smem per kernel.
python benchmarks/dev/sm80/check.py [substring-filter]
"""
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from cupy.cuda import nvrtc

sys.path.insert(0, __import__("os").path.dirname(__file__))
import src  # noqa: E402
import specs  # noqa: E402


def compile_one(name, arch):
    p = nvrtc.createProgram(src.source(), "k.cu", [], [])
    nvrtc.addNameExpression(p, name)
    try:
        nvrtc.compileProgram(p, [f"-arch={arch}", "-Xptxas=-v", "-std=c++17"])
        log = nvrtc.getProgramLog(p)
        ok = True
    except nvrtc.NVRTCError:
        log = nvrtc.getProgramLog(p)
        ok = False
    return ok, log


def parse(log):
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return (int(regs[-1]) if regs else -1,
            sum(int(a) + int(b) for a, b in spill), int(stack[-1]) if stack else -1)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    filt = args[0] if args else ""
    allspecs = specs.variant_specs() if "--variants" in sys.argv else specs.all_specs()
    jobs = [(s, a) for s in allspecs if filt in s.name for a in s.archs]
    bad = 0
    with ThreadPoolExecutor(16) as ex:
        res = list(ex.map(lambda j: compile_one(j[0].name, j[1]), jobs))
    print(f"{'kernel':100s} {'arch':7s} regs spill stack smem")
    for (s, a), (ok, log) in zip(jobs, res):
        if not ok:
            bad += 1
            print(s.name, a, "COMPILE ERROR\n", log[:3000])
            continue
        r, sp, st = parse(log)
        flag = "" if (sp == 0 and r <= 255) else "  <-- SPILL"
        bad += bool(flag)
        print(f"{s.name:100s} {a:7s} {r:4d} {sp:5d} {st:5d} {s.smem:6d}{flag}")
    print("FAILURES:", bad)
    return bad


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
