# slow: an async DROP function. Requests arrive as "<id>::<payload>", many at a time; each is
# answered "<id>::<payload> after <t>s" from its own thread after a random delay of up to one
# second, so replies come back out of order. The id is opaque: it is only echoed back.
import random
import sys
import threading
import time

LOCK = threading.Lock()


def reply(request_id, payload):
    delay = random.uniform(0.0, 1.0)
    time.sleep(delay)
    with LOCK:  # one whole line at a time on stdout
        sys.stdout.write(f"{request_id}::{payload} after {delay:.2f}s\n")
        sys.stdout.flush()


def main():
    for line in sys.stdin:
        request_id, sep, payload = line.rstrip("\n").partition("::")
        if not sep:
            print(f"not an async request: {line!r}", file=sys.stderr, flush=True)
            continue
        threading.Thread(target=reply, args=(request_id, payload), daemon=True).start()
    # stdin closed: let the replies in flight finish before exiting.
    for thread in threading.enumerate():
        if thread is not threading.current_thread():
            thread.join()


if __name__ == "__main__":
    main()
