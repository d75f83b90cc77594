"""Self-contained source text for the sm80 family (quoted includes inlined, #pragma once honoured)."""
import os
import re

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "cuda_src")
_INC = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def inline(path, seen=None):
    seen = set() if seen is None else seen
    path = os.path.normpath(path)
    if path in seen:
        return ""
    text = open(path).read()
    if "#pragma once" in text:
        seen.add(path)
        text = text.replace("#pragma once", "")
    base = os.path.dirname(path)
    return _INC.sub(lambda m: inline(os.path.join(base, m.group(1)), seen), text)


def source():
    seen = set()
    parts = [inline(os.path.join(ROOT, "sm80", f), seen) for f in ("fwd.cuh", "fwd_wg.cuh", "bwd.cuh")
             if os.path.exists(os.path.join(ROOT, "sm80", f))]
    parts.append(inline(os.path.join(ROOT, "generic", "bwd.cuh"), seen))  # preprocess kernel
    return "\n".join(parts)
