"""Copies standard input to standard output line by line, leaving out
lines that match the regular expression DROP and second copies of lines
that match ONCE (compared without the time and thread absl writes
first):

    python -I train/stderr_filter.py DROP ONCE

`train.stderr_without` runs it by path, not with `-m`: importing the
`train` package imports TensorFlow, the very output this filters.
"""

import re
import sys

# absl's prefix: severity, date, time, thread.
PREFIX = re.compile(rb"^[IWEF]\d{4} [\d:.]+ +\d+ ")


def main(drop, once):
    drop, once = re.compile(drop.encode()), re.compile(once.encode())
    seen = set()
    for line in sys.stdin.buffer:
        if drop.search(line):
            continue
        if once.search(line):
            key = PREFIX.sub(b"", line)
            if key in seen:
                continue
            seen.add(key)
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main(*sys.argv[1:3])
