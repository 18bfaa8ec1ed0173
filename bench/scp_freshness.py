"""What stage two's check that images still hold what stage one described costs (`scp_cache.changed_since_described`).

N files of a given size (an ImageNet validation JPEG is ~110 KB on average) are indexed as `mugcp extract`
records them (sha256, size, mtime); the check is timed with the files untouched (one `stat` each), after
their modification times changed (a copy without its times: each file hashed, once per process), and once
more in the same process (the hashes remembered).

    python bench/scp_freshness.py --images 20000 --kb 110
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from mugcp.core import scp_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--kb", type=int, default=110, help="size of each file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index, paths = {}, []
        for i in range(args.images):
            path = f"images/{i % 100:02d}/{i:07d}.jpg"
            file = root / path
            file.parent.mkdir(parents=True, exist_ok=True)
            data = os.urandom(args.kb * 1024)
            file.write_bytes(data)
            st = file.stat()
            index[path] = (hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns)
            paths.append(path)

        def timed(what: str) -> None:
            start = time.perf_counter()
            changed = scp_cache.changed_since_described(root, paths, index)
            seconds = time.perf_counter() - start
            print(f"{what}: {seconds:.2f} s for {len(paths)} images ({1000 * seconds / len(paths):.3f} ms per "
                  f"image), {len(changed)} changed")

        timed("unchanged (stat only)")
        for path in paths:  # the same bytes, new times: a copy without `cp -p`
            os.utime(root / path, ns=(index[path][2] + 10**9, index[path][2] + 10**9))
        timed("times changed (hashed)")
        timed("times changed, same process again (remembered)")


if __name__ == "__main__":
    main()
