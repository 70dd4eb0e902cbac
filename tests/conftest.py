import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import os
import tempfile

# Tests never read or write the user's profile folder (~/.cache/continuo/profiles): a profile left
# there by an earlier run, a bench or another machine's calibration would change what the cost model
# says. And worker processes do not calibrate themselves at start (seconds per model and node kind):
# the tests that cover calibration at start turn it back on themselves. Set before any worker process
# starts, so they inherit it.
os.environ.setdefault("CONTINUO_PROFILES", tempfile.mkdtemp(prefix="continuo-test-profiles-"))
os.environ.setdefault("CONTINUO_CALIBRATE_AT_START", "0")
# ...nor append to the journal in the current directory (.continuo/journal.jsonl) that the CLI
# commands under test write by default.
os.environ.setdefault("CONTINUO_JOURNAL", os.path.join(tempfile.mkdtemp(prefix="continuo-test-journal-"),
                                                       "journal.jsonl"))
