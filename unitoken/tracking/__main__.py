"""``python -m unitoken.tracking replay OUT/pending.jsonl``: send what a stage could not."""

import sys
from pathlib import Path

from unitoken.tracking.runs import replay

if len(sys.argv) == 3 and sys.argv[1] == "replay":
    print(f"replayed {replay(Path(sys.argv[2]))} calls")
else:
    print("usage: python -m unitoken.tracking replay PENDING_JSONL")
    sys.exit(2)
