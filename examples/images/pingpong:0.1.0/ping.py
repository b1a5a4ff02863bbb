# ping: one side of the pingpong flow. Any request starts a game ("ping 1"); "pong <n>" is
# answered with "ping <n+1>" until the round limit (argv[1] or PINGPONG_ROUNDS, default 5),
# then "game over after <n> rounds". Lines it has nothing to say to get an empty reply.
import os
import sys


def rounds():
    text = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PINGPONG_ROUNDS", "5")
    try:
        return max(1, int(text))
    except ValueError:
        return 5


def answer(line, limit):
    words = line.split()
    if len(words) == 2 and words[0] == "pong" and words[1].isdigit():
        n = int(words[1])
        return f"ping {n + 1}" if n < limit else f"game over after {n} rounds"
    if not line or line.startswith("game over"):
        return ""  # the end of a game, or nothing: no new ping
    return "ping 1"  # anything else starts a game


def main():
    limit = rounds()
    for line in sys.stdin:
        sys.stdout.write(answer(line.strip(), limit) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
