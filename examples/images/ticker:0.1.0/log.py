# log: subscribed to the ticker. Each "tick <n> <time>" is noted in the pool's log (stderr)
# together with how late it arrived, and answered "logged tick <n>".
import sys
import time


def main():
    for line in sys.stdin:
        words = line.split()
        if len(words) == 3 and words[0] == "tick":
            late = time.time() - int(words[2])
            print(f"tick {words[1]} arrived {late:.1f}s after it was made", file=sys.stderr, flush=True)
            sys.stdout.write(f"logged tick {words[1]}\n")
        else:
            sys.stdout.write(f"not a tick: {line.strip()}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
