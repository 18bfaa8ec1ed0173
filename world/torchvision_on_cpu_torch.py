"""Make PyPI's torchvision importable beside a CPU build of torch (run with that environment's python).

PyPI's Linux torchvision is a CUDA build. Its compiled ops do not load beside the CPU torch wheel,
yet `torchvision/_meta_registrations.py` registers fake kernels for two of them (`nms`, `qnms`)
unconditionally, so `import torchvision` fails. Guarding those two registrations with
`torchvision.extension._has_ops()` makes it import; the pure-Python transforms, which open_clip,
mugcp and vLLM's Qwen2-VL code use, then work. Where the ops do load nothing changes. The file is
found without importing torchvision; patching twice is a no-op. Used by `build-vllm-cpu-env.sh`
and `scripts/check-floors.sh`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GUARD = "import torchvision.extension as _mugcp_ext\n_mugcp_has_ops = _mugcp_ext._has_ops()\n\n"


def guarded(src: str) -> str:
    """`src` of `_meta_registrations.py` with the `nms`/`qnms` fake registrations made conditional."""
    if "_mugcp_has_ops" in src:
        return src
    for name in ("nms", "qnms"):
        src = src.replace(f'@torch.library.register_fake("torchvision::{name}")',
                          f'@(torch.library.register_fake("torchvision::{name}") if _mugcp_has_ops else (lambda f: f))')
    end_of_imports = src.index("\n\n", src.index("import torch"))
    return src[:end_of_imports] + "\n" + GUARD + src[end_of_imports:]


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed: nothing to patch", file=sys.stderr)
        return 1
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    if path.is_file():
        path.write_text(guarded(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
