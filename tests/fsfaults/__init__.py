"""The file-system fault harness (docs/testing.md, "File-system fault
harness"): every scenario's file-system calls recorded with strace, then a
run killed at each and failed at each (ENOSPC, EIO, EACCES at opens), with
the command line's promises checked after every run.  tests/test_fs_faults.py
runs a bounded pass; `python -m fsfaults` (from tests/, .ci/fsfaults) the
full matrix."""
