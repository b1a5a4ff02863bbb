# pong: the other side of the pingpong flow. "ping <n>" is answered with "pong <n>"; anything
# else (such as "game over ...") gets an empty reply, which ends the exchange.
import sys


def answer(line):
    words = line.split()
    if len(words) == 2 and words[0] == "ping" and words[1].isdigit():
        return f"pong {words[1]}"
    return ""


def main():
    for line in sys.stdin:
        sys.stdout.write(answer(line.strip()) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
