"""Read valgrind XML logs; fail if any error's stack passes through the
apsw_backup extension.  Errors wholly inside the interpreter are counted."""

import sys
import xml.etree.ElementTree as ET

OURS = "_apsw_backup"


def frames(error):
    for stack in error.iter("stack"):
        for frame in stack.iter("frame"):
            yield (frame.findtext("fn") or "?"), (frame.findtext("obj") or "?")


def main(paths):
    ours, others = [], 0
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:  # a process killed mid-write
            print(f"warning: {path}: {exc}")
            continue
        for error in root.iter("error"):
            stack = list(frames(error))
            if any(OURS in obj for _, obj in stack):
                ours.append((error.findtext("kind"), stack))
            else:
                others += 1
    print(
        f"valgrind: {len(paths)} processes, {len(ours)} errors through "
        f"{OURS}, {others} elsewhere (interpreter/libc, not counted)"
    )
    for kind, stack in ours:
        print(f"\n{kind}:")
        for fn, obj in stack[:25]:
            print(f"    {fn}  ({obj.rsplit('/', 1)[-1]})")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
