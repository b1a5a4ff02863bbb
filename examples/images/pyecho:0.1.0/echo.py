# pyecho: answers every request line with the same payload (DROP sync protocol). Newlines inside
# a payload arrive encoded as "\tncm\t"; they are decoded and encoded again on the way out.
import sys

NEWLINE = "\tncm\t"


def main():
    for line in sys.stdin:
        payload = line.rstrip("\n").replace(NEWLINE, "\n")
        sys.stdout.write(payload.replace("\n", NEWLINE) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
