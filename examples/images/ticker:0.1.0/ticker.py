# ticker: a stream DROP function. It reads nothing and prints "tick <n> <unix time>" every
# second; each line is an event for the pools subscribed to it.
import sys
import time


def main():
    n = 0
    start = time.monotonic()
    while True:
        n += 1
        sys.stdout.write(f"tick {n} {int(time.time())}\n")
        sys.stdout.flush()
        # Sleep to the next whole second after start, so ticks do not drift.
        time.sleep(max(0.0, start + n - time.monotonic()))


if __name__ == "__main__":
    main()
