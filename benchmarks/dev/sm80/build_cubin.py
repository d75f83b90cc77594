"""Compiles every spec for sm_90a here (no GPU needed) into benchmarks/dev/sm80/build/, so the
GPU run spends no device time in NVRTC.  Writes one cubin per kernel and names.json
{name_expression: [cubin file, lowered name]}."""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from cupy.cuda import nvrtc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import src  # noqa: E402
import specs  # noqa: E402

OUT = os.environ.get("HARNESS_BUILD", os.path.join(HERE, "build"))
DEFINES = [f"-D{d}" for d in os.environ.get("HARNESS_DEFINES", "").split()]
EXTRA = ["fc_generic_bwd_preprocess<fc_bf16, float, 4>", "fc_generic_bwd_preprocess<fc_half, float, 4>"]


def build(i_name, arch="sm_90a"):
    i, name = i_name
    p = nvrtc.createProgram(src.source(), "k.cu", [], [])
    nvrtc.addNameExpression(p, name)
    nvrtc.compileProgram(p, [f"-arch={arch}", "-std=c++17"] + DEFINES)
    fn = f"k{i}.cubin"
    with open(os.path.join(OUT, fn), "wb") as f:
        f.write(nvrtc.getCUBIN(p))
    return name, [fn, nvrtc.getLoweredName(p, name)]


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    var = [s for t in specs.DTYPES for s in specs.variant_specs(t, kinds=("fwd",))]
    if "--bwd-variants" in sys.argv:
        var += specs.variant_specs(kinds=("dkdvq", "dkdv"))
    names = sorted({s.name for s in specs.all_specs() + var}) + EXTRA
    with ThreadPoolExecutor(16) as ex:
        res = dict(ex.map(build, enumerate(names)))
    json.dump(res, open(os.path.join(OUT, "names.json"), "w"), indent=1)
    print(len(res), "kernels")
